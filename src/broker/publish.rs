//! Publishing: pipelined [`publish_all`] for the `publish` command, and [`publish_acked`] (one
//! message, confirmed) for dead letters; the checks of what a NATS header can carry.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use nats::header::HeaderMap;

use super::flush::FlushRequester;
use super::{api, status_of, BrokerError};

/// Publishes in flight before the publisher waits for acknowledgements.
const PUBLISH_WINDOW: usize = 512;
/// How often a message is sent before its missing acknowledgement fails the publish.
const PUBLISH_TRIES: u32 = 3;
/// How long a message nobody took (503) waits before it is sent again.
const NO_RESPONDERS_PAUSE: Duration = Duration::from_millis(250);

/// A message to publish.
#[derive(Debug, Clone)]
pub(crate) struct OutMessage {
    /// The `Nats-Msg-Id` used to de-duplicate resends.
    pub id: String,
    pub headers: Vec<(String, String)>,
    pub data: Vec<u8>,
}

impl OutMessage {
    /// The id and the headers, as NATS sends them.
    fn header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(nats::header::NATS_MSG_ID, self.id.as_str());
        for (k, v) in &self.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        headers
    }
}

fn parse_pub_ack(reply: &nats::Message, subject: &str) -> Result<u64, BrokerError> {
    if let Some(status) = status_of(reply) {
        return Err(BrokerError::Publish(if status == "503" {
            format!("no stream captures subject {subject}")
        } else {
            format!("status {status} from the server")
        }));
    }
    #[derive(serde::Deserialize)]
    struct Ack {
        seq: Option<u64>,
        error: Option<serde_json::Value>,
    }
    let ack: Ack = serde_json::from_slice(&reply.data)
        .map_err(|e| BrokerError::Publish(format!("unreadable acknowledgement: {e}")))?;
    match (ack.seq, ack.error) {
        (_, Some(err)) => Err(BrokerError::Publish(err.to_string())),
        (Some(seq), None) => Ok(seq),
        (None, None) => Err(BrokerError::Publish(
            "acknowledgement without a sequence".into(),
        )),
    }
}

/// Whether a text can be a `Nats-Msg-Id`: a short token of letters, digits, `-`, `_`, `.`.
pub(crate) fn valid_msg_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether a text can go into a NATS header value as it is: printable, no CR, LF or NUL,
/// at most 4 KiB.
pub(crate) fn valid_header_value(v: &str) -> bool {
    v.len() <= 4096 && !v.chars().any(|c| c.is_control())
}

/// A text made fit for a NATS header value: control characters become spaces, and it is cut
/// to 512 bytes (at a character boundary).
pub(crate) fn header_value_lossy(v: &str) -> String {
    let mut out = String::with_capacity(v.len().min(512));
    for c in v.chars() {
        if out.len() + c.len_utf8() > 512 {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

fn valid_header_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 256 && n.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Publishes messages to JetStream with de-duplication ids, many in flight at once, and
/// waits for every acknowledgement. Returns the stream sequence of each.
pub(super) fn publish_all(
    nc: &nats::Connection,
    flush: &FlushRequester,
    subject: &str,
    messages: &[OutMessage],
    ack_timeout: Duration,
) -> Result<Vec<u64>, BrokerError> {
    let prefix = nc.new_inbox();
    let sub = nc
        .subscribe(&format!("{prefix}.*"))
        .map_err(api("subscribing for publish acknowledgements"))?;
    let mut seqs = vec![0u64; messages.len()];
    let mut sent: HashMap<usize, (Instant, u32)> = HashMap::new();
    let (mut next, mut done) = (0, 0);
    let send = |i: usize| -> Result<(), BrokerError> {
        let m = &messages[i];
        let headers = m.header_map();
        nc.publish_with_reply_or_headers(
            subject,
            Some(&format!("{prefix}.{i}")),
            Some(&headers),
            &m.data,
        )
        .map_err(|e| BrokerError::Publish(e.to_string()))
    };
    while done < messages.len() {
        while sent.len() < PUBLISH_WINDOW && next < messages.len() {
            send(next)?;
            sent.insert(next, (Instant::now(), 1));
            next += 1;
        }
        // The flusher sends them: a flush here could wait for a PONG forever.
        flush.request();
        match sub.next_timeout(ack_timeout) {
            Ok(reply) => {
                let Some(i) = reply
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|s| s.parse::<usize>().ok())
                else {
                    continue;
                };
                // 503: nobody took the message. Right after a stream is made in a cluster the
                // server this connection is on may not know it yet; send it again shortly
                // (Nats-Msg-Id makes a resend safe), up to the tries.
                if status_of(&reply) == Some("503") {
                    if let Some((at, tries)) = sent.get_mut(&i) {
                        if *tries < PUBLISH_TRIES {
                            let due = Instant::now() + NO_RESPONDERS_PAUSE;
                            *at = due.checked_sub(ack_timeout).unwrap_or(*at);
                            continue;
                        }
                    }
                }
                if sent.remove(&i).is_none() {
                    continue;
                }
                seqs[i] = parse_pub_ack(&reply, subject)?;
                done += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                let now = Instant::now();
                for (i, (at, tries)) in sent.iter_mut() {
                    if now.duration_since(*at) < ack_timeout {
                        continue;
                    }
                    if *tries >= PUBLISH_TRIES {
                        return Err(BrokerError::Publish(format!(
                            "no acknowledgement for message {} after {PUBLISH_TRIES} tries",
                            messages[*i].id
                        )));
                    }
                    send(*i)?;
                    *at = now;
                    *tries += 1;
                }
            }
            Err(e) => return Err(BrokerError::Publish(e.to_string())),
        }
    }
    Ok(seqs)
}

/// Publishes one message once and waits up to `timeout` for the server to confirm it is
/// stored; returns its stream sequence. Headers NATS cannot carry are refused.
pub(super) fn publish_acked(
    nc: &nats::Connection,
    subject: &str,
    message: &OutMessage,
    timeout: Duration,
) -> Result<u64, BrokerError> {
    if !valid_msg_id(&message.id) {
        return Err(BrokerError::Publish(format!(
            "invalid message id {:?}",
            message.id
        )));
    }
    if let Some((k, _)) = message
        .headers
        .iter()
        .find(|(k, v)| !valid_header_name(k) || !valid_header_value(v))
    {
        return Err(BrokerError::Publish(format!(
            "header {k:?} cannot go into a NATS message"
        )));
    }
    let headers = message.header_map();
    let reply = nc
        .request_with_headers_or_timeout(subject, Some(&headers), Some(timeout), &message.data)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                BrokerError::Publish(format!("no stream captures subject {subject}"))
            }
            io::ErrorKind::TimedOut => {
                BrokerError::Publish(format!("no acknowledgement within {timeout:?}"))
            }
            _ => BrokerError::Publish(e.to_string()),
        })?;
    parse_pub_ack(&reply, subject)
}

#[cfg(test)]
mod header_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nats_header_checks() {
        assert!(valid_msg_id("dead-3f2a-11"));
        assert!(!valid_msg_id("a\r\nX-Evil: 1"));
        assert!(!valid_msg_id(""));
        assert!(!valid_msg_id(&"a".repeat(129)));
        assert!(valid_header_value("status 503"));
        assert!(!valid_header_value("a\r\nb"));
        assert_eq!(header_value_lossy("a\r\nb"), "a  b");
        assert!(!valid_header_name("X:Y"));
    }

    proptest! {
        #[test]
        fn lossy_values_are_always_valid(s in "\\PC{0,600}|[\\x00-\\x1f]{0,20}") {
            let v = header_value_lossy(&s);
            prop_assert!(valid_header_value(&v));
            prop_assert!(v.len() <= 512);
        }
    }
}
