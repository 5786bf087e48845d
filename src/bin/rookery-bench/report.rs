//! A run's results: the [`Report`] a scenario fills, the table printed from it and the JSON
//! written with `--json` (with the machine and, given `--pg-url`, the Postgres settings it ran
//! on, read by bench/summarize.py). Calls no other module of the bench.

use rookery::checker::Verdict;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// What one run measured.
#[derive(Default)]
pub struct Report {
    pub figures: BTreeMap<String, Value>,
    pub verdict: Option<Verdict>,
}

impl Report {
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.to_string(), value.into());
    }
}

pub fn print_table(scenario: &str, params: &Value, report: &Report) {
    println!("scenario  {scenario}");
    println!("params    {params}");
    for (key, value) in &report.figures {
        match value {
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() != 0.0 => println!("{key:<34} {f:>14.1}"),
                _ => println!("{key:<34} {n:>14}"),
            },
            Value::Object(o) if o.contains_key("p99_ms") => println!(
                "{key:<34} p50 {:>7.2} p90 {:>7.2} p99 {:>7.2} p99.9 {:>7.2} max {:>8.2} ms (n={})",
                o["p50_ms"].as_f64().unwrap_or(0.0),
                o["p90_ms"].as_f64().unwrap_or(0.0),
                o["p99_ms"].as_f64().unwrap_or(0.0),
                o["p999_ms"].as_f64().unwrap_or(0.0),
                o["max_ms"].as_f64().unwrap_or(0.0),
                o["count"]
            ),
            other => println!("{key:<34} {other}"),
        }
    }
    match &report.verdict {
        Some(v) => println!(
            "verdict   {}",
            if v.is_clean() {
                format!("clean ({v})")
            } else {
                format!("NOT CLEAN: {v}")
            }
        ),
        None => println!("verdict   (not applicable)"),
    }
}

/// Writes the results of `scenario` as JSON to `path`.
pub fn write_json(
    path: &Path,
    scenario: &str,
    params: &Value,
    report: &Report,
    pg_url: Option<&str>,
) -> std::io::Result<()> {
    let out = json!({
        "scenario": scenario,
        "parameters": params,
        "figures": report.figures,
        "verdict": report.verdict.as_ref().map(|v| json!({
            "clean": v.is_clean(), "acked": v.acked, "delivered": v.delivered,
            "lost": v.lost.len(), "duplicated": v.duplicated.len(), "reordered": v.reordered.len(),
            "gaps": v.gaps.len(), "phantom": v.phantom.len(),
        })),
        "machine": machine(pg_url),
    });
    std::fs::write(path, format!("{out:#}\n"))
}

fn machine(pg_url: Option<&str>) -> Value {
    let memory_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut out = json!({"cores": cores, "memory_kib": memory_kib});
    if let Some(url) = pg_url {
        out["postgres"] = postgres_settings(url);
    }
    out
}

fn postgres_settings(url: &str) -> Value {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        setting: String,
    }
    let Ok(mut conn) = diesel::PgConnection::establish(url) else {
        return json!("unreachable");
    };
    let rows = diesel::sql_query(
        "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', 'synchronous_commit', \
         'fsync', 'shared_buffers', 'max_connections', 'wal_level', 'commit_delay')",
    )
    .load::<Setting>(&mut conn)
    .unwrap_or_default();
    Value::Object(
        rows.into_iter()
            .map(|r| (r.name, Value::from(r.setting)))
            .collect(),
    )
}
