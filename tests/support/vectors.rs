//! The gateway test vectors (`tests/data/queue-requests.jsonl`) and Go's JSON encoding of them:
//! the one loader, compiled into the integration tests that send them (`tests/core.rs`) and into
//! the unit tests of `src/request.rs` (both with `#[path]`), so the two cannot drift.

use serde_json::Value;

/// Every case of `tests/data/queue-requests.jsonl` (`case`, `message`, `expect`), embedded at
/// build time so the tests read the repository's copy and need nothing beside the checkout.
pub fn vectors() -> Vec<Value> {
    include_str!("../data/queue-requests.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a test vector line is JSON"))
        .collect()
}

/// `v` as Go's encoding/json writes it: serde_json leaves `&`, `<` and `>` as they are, Go writes
/// `\u0026`, `\u003c` and `\u003e`. Send (or decode) the bytes Go sends.
pub fn go_json(v: &Value) -> Vec<u8> {
    serde_json::to_string(v)
        .expect("a JSON value serializes")
        .replace('&', "\\u0026")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .into_bytes()
}
