//! The echo baseline: the smallest WebSocket echo server on Rookery's stack (actix-web,
//! actix-web-actors), plain ws, no parsing and no storage. `rookery-bench echo` measures it
//! beside the real server.

use actix::{ActorContext, StreamHandler};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;

struct Echo;

impl actix::Actor for Echo {
    type Context = ws::WebsocketContext<Echo>;
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Echo {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match data_frame(item, ctx) {
            Some(ws::Message::Text(text)) => ctx.text(text),
            Some(ws::Message::Binary(data)) => ctx.binary(data),
            _ => {}
        }
    }
}

/// What both baseline servers do with a control frame: a ping is answered, a close or a
/// protocol error ends the connection. Returns the frames left for the server itself.
pub fn data_frame<A>(
    item: Result<ws::Message, ws::ProtocolError>,
    ctx: &mut ws::WebsocketContext<A>,
) -> Option<ws::Message>
where
    A: actix::Actor<Context = ws::WebsocketContext<A>>,
{
    match item {
        Ok(ws::Message::Ping(data)) => ctx.pong(&data),
        Ok(ws::Message::Close(reason)) => {
            ctx.close(reason);
            ctx.stop();
        }
        Ok(other) => return Some(other),
        Err(_) => ctx.stop(),
    }
    None
}

async fn echo_route(
    req: HttpRequest,
    stream: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    ws::start(Echo, &req, stream)
}

/// Runs the echo server on `bind` until interrupted.
pub fn run(bind: &str) -> std::io::Result<()> {
    let bind = bind.to_string();
    actix::System::new().block_on(async move {
        actix_web::HttpServer::new(|| actix_web::App::new().route("/", web::get().to(echo_route)))
            .bind(bind)?
            .run()
            .await
    })
}
