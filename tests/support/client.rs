//! NATS client helpers: the test's own connection to a [`super::NatsServer`] (publishing and
//! reading stream and consumer state through JetStream).

use std::time::Duration;

use serde_json::Value;

/// Connects to `url` with no delay before the first attempt, quick reconnects (at most 500 ms
/// apart) and no reconnect limit; panics if the server cannot be reached.
#[allow(dead_code)] // shared: not every test file uses it
pub fn connect(url: &str) -> ::nats::Connection {
    ::nats::Options::new()
        .with_name("queue-worker-tests")
        .max_reconnects(None)
        .reconnect_delay_callback(|n| {
            if n == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis((n as u64).saturating_mul(25).min(500))
            }
        })
        .connect(url)
        .unwrap_or_else(|e| panic!("connecting to NATS at {url}: {e}"))
}

/// A JetStream context on `nc`.
#[allow(dead_code)] // shared: not every test file uses it
pub fn jetstream(nc: &::nats::Connection) -> ::nats::jetstream::JetStream {
    ::nats::jetstream::new(nc.clone())
}

/// Publishes `data` to `subject` through JetStream and waits (5 s at most) for the PubAck.
#[allow(dead_code)] // shared: not every test file uses it
pub fn publish_raw(
    nc: &::nats::Connection,
    subject: &str,
    data: &[u8],
) -> ::nats::jetstream::PublishAck {
    let opts = ::nats::jetstream::PublishOptions {
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    jetstream(nc)
        .publish_with_options(subject, data, &opts)
        .unwrap_or_else(|e| {
            panic!(
                "JetStream publish to {subject:?} ({} bytes): {e}",
                data.len()
            )
        })
}

/// Publishes `msg` serialized as JSON, like [`publish_raw`].
#[allow(dead_code)] // shared: not every test file uses it
pub fn publish_json(
    nc: &::nats::Connection,
    subject: &str,
    msg: &Value,
) -> ::nats::jetstream::PublishAck {
    publish_raw(
        nc,
        subject,
        &serde_json::to_vec(msg).expect("serializing a JSON message"),
    )
}

/// How many messages `stream` holds now.
#[allow(dead_code)] // shared: not every test file uses it
pub fn stream_messages(nc: &::nats::Connection, stream: &str) -> u64 {
    jetstream(nc)
        .stream_info(stream)
        .unwrap_or_else(|e| panic!("stream info of {stream:?}: {e}"))
        .state
        .messages
}

/// The server's view of consumer `durable` on `stream`.
#[allow(dead_code)] // shared: not every test file uses it
pub fn consumer_info(
    nc: &::nats::Connection,
    stream: &str,
    durable: &str,
) -> ::nats::jetstream::ConsumerInfo {
    jetstream(nc)
        .consumer_info(stream, durable)
        .unwrap_or_else(|e| panic!("consumer info of {stream:?}/{durable:?}: {e}"))
}

/// A pull request for one message of `consumer` on `stream`, waiting at the server up to
/// `expires`, flushed; its answer (the message, or a status) comes on the returned
/// subscription.
#[allow(dead_code)] // shared: not every test file uses it
pub fn pull_request(
    nc: &::nats::Connection,
    stream: &str,
    consumer: &str,
    expires: std::time::Duration,
) -> ::nats::Subscription {
    let inbox = nc.new_inbox();
    let sub = nc.subscribe(&inbox).expect("subscribing a pull inbox");
    let body = format!(r#"{{"batch":1,"expires":{}}}"#, expires.as_nanos());
    nc.publish_request(
        &format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
        &inbox,
        body,
    )
    .expect("publishing a pull request");
    nc.flush().expect("flushing a pull request");
    sub
}
