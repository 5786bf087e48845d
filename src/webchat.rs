//! The built-in web chat: `GET /` and its script and stylesheet, embedded in the binary from
//! `web/` (no build step, nothing fetched from elsewhere). The page speaks docs/protocol.md to
//! `/ws` of the origin it came from, which the Origin check admits. Owns only these responses.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// Only the page's own script, stylesheet and WebSocket: no inline code, no other origin.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, PAGE_POLICY))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

async fn page() -> HttpResponse {
    file(
        "text/html; charset=utf-8",
        include_str!("../web/index.html"),
    )
}

async fn script() -> HttpResponse {
    file(
        "text/javascript; charset=utf-8",
        include_str!("../web/app.js"),
    )
}

async fn style() -> HttpResponse {
    file("text/css; charset=utf-8", include_str!("../web/style.css"))
}

/// Adds the web chat's routes to an app.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/", web::get().to(page))
        .route("/app.js", web::get().to(script))
        .route("/style.css", web::get().to(style));
}
