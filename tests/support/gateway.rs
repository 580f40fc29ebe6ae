//! OpenFaaS gateway messages: `QueueRequest`s as the gateway publishes them, with Go's
//! `url.URL` object for callbacks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A fresh, unique, UUID-shaped call id (like the gateway's X-Call-Id).
pub fn new_call_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let t = now_nanos() as u64;
    let pid = u64::from(std::process::id());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (t >> 32) as u32,
        (t >> 16) & 0xffff,
        (t >> 4) & 0xfff,
        pid & 0xfff,
        ((pid & 0xffff) << 32 | (n & 0xffff_ffff)) & 0xffff_ffff_ffff
    )
}

/// A QueueRequest as the OpenFaaS gateway publishes it for `POST /async-function/<function>`:
/// Header (with a fresh X-Call-Id and X-Start-Time), Host, Body (standard base64), Method
/// "POST", empty Path, QueryString and QueueName, CallbackUrl null.
#[allow(dead_code)] // shared: not every test file uses it
pub fn gateway_request(function: &str, body: &[u8]) -> Value {
    json!({
        "Header": {
            "X-Call-Id": [new_call_id()],
            "X-Start-Time": [now_nanos().to_string()],
        },
        "Host": "127.0.0.1:8080",
        "Body": base64::engine::general_purpose::STANDARD.encode(body),
        "Method": "POST",
        "Path": "",
        "QueryString": "",
        "Function": function,
        "QueueName": "",
        "CallbackUrl": Value::Null,
    })
}

/// `req` with a callback: CallbackUrl as Go's url.URL object parsed from `url`, and the
/// "X-Callback-Url" header.
#[allow(dead_code)] // shared: not every test file uses it
pub fn with_callback(mut req: Value, url: &str) -> Value {
    req["CallbackUrl"] = go_url(url);
    if !req["Header"].is_object() {
        req["Header"] = json!({});
    }
    req["Header"]["X-Callback-Url"] = json!([url]);
    req
}

/// `url` ("scheme://[user@]host[/path][?query][#fragment]") as Go's encoding/json writes a
/// parsed `*url.URL` (Path unescaped, RawPath only when needed, like `url.Parse`).
#[allow(dead_code)] // shared: not every test file uses it
pub fn go_url(url: &str) -> Value {
    // One implementation with the worker's: url.Parse's Path/RawPath and Fragment/RawFragment.
    let parsed = queue_worker::request::GoUrl::parse(url)
        .unwrap_or_else(|| panic!("go_url: {url:?} is not a URL Go would parse"));
    serde_json::to_value(parsed).expect("a GoUrl serializes")
}
