//! NATS authentication and TLS against a real nats-server: token, user/password (variables and
//! URL), nkey, a credentials file from JWTs made here (operator mode), and TLS with a CA and a
//! client certificate made here. Each mode runs a message end to end through `publish`, the
//! worker and `status`; a wrong secret makes the worker and `status` exit 1 at once, saying what
//! the server refused, without showing the secret.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use support::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;
/// A refusal must end the process well before this (a server that is down is retried forever).
const REFUSAL_DEADLINE: Duration = Duration::from_secs(20);

/// The environment of one mode: the URL and the auth/TLS variables.
struct Access {
    url: String,
    env: Vec<(String, String)>,
}

impl Access {
    fn new(url: impl Into<String>, env: &[(&str, &str)]) -> Access {
        Access {
            url: url.into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Everything the binary gets: the URL, no metrics port clash, and the mode's variables.
    fn cli_env(&self) -> Vec<(&str, &str)> {
        let mut env = vec![("nats_url", self.url.as_str()), ("metrics_port", "0")];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        env
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `publish` puts a message on the queue, `status` sees it, the worker runs it, `status` sees
/// the queue empty: every connect path with this access. No output shows `secret`.
fn runs_end_to_end(access: &Access, secret: &str) {
    let function = FunctionServer::echo();
    let env = access.cli_env();
    let out = run_cli(&["publish", "figlet", "-d", "secured"], &env);
    assert!(out.status.success(), "publish: {}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(secret) && !text(&out.stdout).contains(secret));
    let out = run_cli(&["status"], &env);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(secret) && !text(&out.stdout).contains(secret));
    let out = run_cli(&["status", "--json"], &env);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["messages"], 1, "{status}");

    let mut builder = Worker::builder(access.url.clone(), function.url());
    for (k, v) in &access.env {
        builder = builder.env(k.as_str(), v.as_str());
    }
    let worker = builder.start();
    let seen = function.wait_for_count(1, SECS(15));
    assert!(
        seen[0].url.starts_with("/function/figlet"),
        "{}",
        seen[0].url
    );
    assert_eq!(seen[0].body, b"secured");
    wait_until(SECS(10), "the queue empty", || {
        let out = run_cli(&["status", "--json"], &env);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!({}));
        v["messages"] == 0 && v["ack_pending"] == 0
    });
    let logs = worker.logs();
    assert!(logs.contains("connected to NATS"), "{logs}");
    assert!(
        !logs.contains(secret),
        "the worker logged the secret: {logs}"
    );
    drop(worker);
}

/// The worker and `status` both exit 1 before [`REFUSAL_DEADLINE`], naming what was refused,
/// and never print `secret`. Returns the worker's stderr.
fn refused(access: &Access, expect: &str, secret: Option<&str>) -> String {
    let env = access.cli_env();
    let start = Instant::now();
    let out = run_cli_with(&[], &env, None, REFUSAL_DEADLINE);
    let took = start.elapsed();
    let stderr = text(&out.stderr);
    eprintln!("worker refused after {took:?}: {stderr}");
    assert_eq!(out.status.code(), Some(1), "worker: {stderr}");
    assert!(
        stderr.contains("refused the connection") && stderr.contains(expect),
        "worker stderr lacks {expect:?}: {stderr}"
    );
    let status = run_cli_with(&["status"], &env, None, REFUSAL_DEADLINE);
    let status_err = text(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "status: {status_err}");
    assert!(status_err.contains(expect), "status: {status_err}");
    if let Some(secret) = secret {
        for shown in [&stderr, &text(&out.stdout), &status_err] {
            assert!(!shown.contains(secret), "the secret was shown: {shown}");
        }
    }
    stderr
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn token_from_a_file_or_a_variable() {
    let nats = NatsServer::start_with_config("authorization { token: \"t0ken-s3cret\" }\n");
    let dir = tempfile::tempdir().unwrap();
    // A mounted secret ends with a newline.
    let file = write(dir.path(), "token", "t0ken-s3cret\n");
    runs_end_to_end(
        &Access::new(nats.url(), &[("nats_token_file", path_str(&file))]),
        "t0ken-s3cret",
    );
    runs_end_to_end(
        &Access::new(nats.url(), &[("nats_token", "t0ken-s3cret")]),
        "t0ken-s3cret",
    );

    refused(
        &Access::new(nats.url(), &[("nats_token", "wrong-t0ken")]),
        "authorization violation",
        Some("wrong-t0ken"),
    );
    // No token at all.
    refused(
        &Access::new(nats.url(), &[]),
        "authorization violation",
        None,
    );
}

#[test]
fn user_and_password_from_variables_a_file_or_the_url() {
    let nats = NatsServer::start_with_config(
        "authorization { user: \"worker\", password: \"pa55-s3cret\" }\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "password", "pa55-s3cret\n");
    runs_end_to_end(
        &Access::new(
            nats.url(),
            &[
                ("nats_user", "worker"),
                ("nats_password_file", path_str(&file)),
            ],
        ),
        "pa55-s3cret",
    );
    let with_userinfo = format!("nats://worker:pa55-s3cret@127.0.0.1:{}", nats.port());
    runs_end_to_end(&Access::new(with_userinfo, &[]), "pa55-s3cret");

    refused(
        &Access::new(
            nats.url(),
            &[("nats_user", "worker"), ("nats_password", "wr0ng-pa55")],
        ),
        "authorization violation",
        Some("wr0ng-pa55"),
    );
    let wrong_url = format!("nats://worker:wr0ng-pa55@127.0.0.1:{}", nats.port());
    let stderr = refused(
        &Access::new(wrong_url, &[]),
        "authorization violation",
        Some("wr0ng-pa55"),
    );
    assert!(stderr.contains("worker:***@127.0.0.1"), "{stderr}");
}

#[test]
fn nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}\n",
        user.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let seed = user.seed().unwrap();
    let file = write(dir.path(), "seed", &format!("{seed}\n"));
    runs_end_to_end(
        &Access::new(nats.url(), &[("nats_nkey_seed_file", path_str(&file))]),
        &seed,
    );

    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let wrong = write(dir.path(), "wrong-seed", &other);
    refused(
        &Access::new(nats.url(), &[("nats_nkey_seed_file", path_str(&wrong))]),
        "authorization violation",
        Some(&other),
    );
}

// ---------------------------------------------------------------------------------------------
// JWTs for operator mode, signed with nkeys: header.claims.signature, each base64url.

fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "jti": format!("T{}{}", now, fastrand_name()),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let sig = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn fastrand_name() -> String {
    new_call_id().replace('-', "").to_uppercase()
}

fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[test]
fn credentials_file_from_a_jwt_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
    });
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "test-account",
        json!({"type": "account", "version": 2, "limits": unlimited,
               "default_permissions": {"pub": {}, "sub": {}}}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "worker",
        json!({"type": "user", "version": 2, "pub": {}, "sub": {},
               "subs": -1, "data": -1, "payload": -1}),
    );
    // JetStream needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );
    let nats = NatsServer::start_with_config(&format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {acc}: \"{account_jwt}\"\n  {sys}: \"{system_jwt}\"\n}}\n",
        acc = account.public_key(),
        sys = system.public_key(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let creds = write(
        dir.path(),
        "worker.creds",
        &creds_file(&user_jwt, &user.seed().unwrap()),
    );
    runs_end_to_end(
        &Access::new(nats.url(), &[("nats_creds_file", path_str(&creds))]),
        &user.seed().unwrap(),
    );

    // A user JWT signed by an account the server does not know.
    let stranger = nkeys::KeyPair::new_account();
    let stranger_jwt = jwt(
        &stranger,
        &user.public_key(),
        "worker",
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}}),
    );
    let seed = user.seed().unwrap();
    let wrong = write(
        dir.path(),
        "stranger.creds",
        &creds_file(&stranger_jwt, &seed),
    );
    refused(
        &Access::new(nats.url(), &[("nats_creds_file", path_str(&wrong))]),
        "authorization violation",
        Some(&seed),
    );
}

// ---------------------------------------------------------------------------------------------
// TLS: a CA, a server certificate for 127.0.0.1 and a client certificate, made here.

struct Pki {
    dir: tempfile::TempDir,
}

struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// A certificate and its key, PEM each; `expired` puts its validity in the past.
    fn issue(&self, names: &[&str], client: bool, expired: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            if client { "worker" } else { "nats" },
        );
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self, name: &str, contents: &str) -> String {
        path_str(&write(self.dir.path(), name, contents)).to_string()
    }
}

/// A server requiring TLS and a client certificate from `ca`; `expired` gives it an expired
/// certificate of its own.
fn tls_server(pki: &Pki, ca: &Ca, tag: &str, expired: bool) -> NatsServer {
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"], false, expired);
    let ca_file = pki.file(&format!("{tag}-server-ca.pem"), &ca.issuer.pem());
    let cert_file = pki.file(&format!("{tag}-server.pem"), &cert);
    let key_file = pki.file(&format!("{tag}-server-key.pem"), &key);
    NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{cert_file}\"\n  key_file: \"{key_file}\"\n  ca_file: \"{ca_file}\"\n  verify: true\n  timeout: 2\n}}\n"
    ))
}

#[test]
fn tls_with_a_private_ca_and_a_client_certificate() {
    let pki = Pki::new();
    let ca = Ca::new("queue-worker test CA");
    let nats = tls_server(&pki, &ca, "good", false);
    let ca_file = pki.file("ca.pem", &ca.issuer.pem());
    let (cert, key) = ca.issue(&["worker"], true, false);
    let cert_file = pki.file("client.pem", &cert);
    let key_file = pki.file("client-key.pem", &key);
    let tls_url = format!("tls://127.0.0.1:{}", nats.port());
    let good = [
        ("nats_tls_ca_file", ca_file.as_str()),
        ("nats_tls_cert_file", cert_file.as_str()),
        ("nats_tls_key_file", key_file.as_str()),
    ];
    // A CA file turns TLS on for a nats:// URL; a tls:// URL does too.
    runs_end_to_end(&Access::new(nats.url(), &good), "PRIVATE KEY");
    runs_end_to_end(&Access::new(tls_url.clone(), &good), "PRIVATE KEY");

    // The server's certificate is signed by a CA the worker was not given.
    let other_ca = pki.file("other-ca.pem", &Ca::new("another CA").issuer.pem());
    refused(
        &Access::new(
            nats.url(),
            &[
                ("nats_tls_ca_file", other_ca.as_str()),
                ("nats_tls_cert_file", cert_file.as_str()),
                ("nats_tls_key_file", key_file.as_str()),
            ],
        ),
        "unknown CA",
        None,
    );
    // No client certificate.
    refused(
        &Access::new(nats.url(), &[("nats_tls_ca_file", ca_file.as_str())]),
        "requires a client certificate",
        None,
    );
    // A client certificate from another CA.
    let (stranger_cert, stranger_key) = Ca::new("stranger CA").issue(&["worker"], true, false);
    let stranger_cert = pki.file("stranger.pem", &stranger_cert);
    let stranger_key = pki.file("stranger-key.pem", &stranger_key);
    refused(
        &Access::new(
            nats.url(),
            &[
                ("nats_tls_ca_file", ca_file.as_str()),
                ("nats_tls_cert_file", stranger_cert.as_str()),
                ("nats_tls_key_file", stranger_key.as_str()),
            ],
        ),
        "does not trust the client certificate",
        None,
    );
}

#[test]
fn tls_refusals_expired_server_certificate_tls_required_and_plain_server() {
    let pki = Pki::new();
    let ca = Ca::new("queue-worker test CA");
    let ca_file = pki.file("ca.pem", &ca.issuer.pem());
    let (cert, key) = ca.issue(&["worker"], true, false);
    let cert_file = pki.file("client.pem", &cert);
    let key_file = pki.file("client-key.pem", &key);
    let env = [
        ("nats_tls_ca_file", ca_file.as_str()),
        ("nats_tls_cert_file", cert_file.as_str()),
        ("nats_tls_key_file", key_file.as_str()),
    ];
    let expired = tls_server(&pki, &ca, "expired", true);
    refused(
        &Access::new(expired.url(), &env),
        "expired certificate",
        None,
    );

    // TLS required by the server, and no CA given: the system roots do not know the test CA.
    let good = tls_server(&pki, &ca, "good", false);
    refused(
        &Access::new(good.url(), &[]),
        "the server requires TLS",
        None,
    );

    // A plain server when TLS is asked for.
    let plain = NatsServer::start();
    refused(&Access::new(plain.url(), &env), "does not offer TLS", None);
}

#[test]
fn contradictory_settings_exit_2_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "t\n");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("nats_token", "s3cret-a"),
                ("nats_user", "u"),
                ("nats_password", "s3cret-b"),
            ],
            "nats_user",
        ),
        (
            &[
                ("nats_token", "s3cret-a"),
                ("nats_token_file", path_str(&token)),
            ],
            "nats_token",
        ),
        (&[("nats_user", "u")], "nats_user"),
        (&[("nats_password", "s3cret-b")], "nats_password"),
        (
            &[("nats_tls_cert_file", path_str(&token))],
            "nats_tls_cert_file",
        ),
        (
            &[("nats_token_file", "/nonexistent/token")],
            "nats_token_file",
        ),
        (
            &[
                ("nats_url", "nats://u:s3cret-b@127.0.0.1:4222"),
                ("nats_token", "s3cret-a"),
            ],
            "nats_url",
        ),
    ];
    for (env, var) in cases {
        let mut env = env.to_vec();
        env.push(("metrics_port", "0"));
        let out = run_cli_with(&[], &env, None, SECS(10));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(var), "{env:?}: {stderr}");
        assert!(
            !stderr.contains("s3cret-a") && !stderr.contains("s3cret-b"),
            "{stderr}"
        );
    }
    let help = run_cli(&["--help"], &[("nats_token", "s3cret-a")]);
    assert!(text(&help.stdout).contains("nats_token_file"));
    assert!(!text(&help.stdout).contains("s3cret-a"));
}
