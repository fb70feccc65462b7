//! The device end of the check-in protocol (`docs/protocol.md`): JSON over HTTP(S) with
//! ureq, the server verified against the CA on the boot partition, the device's credential
//! as a bearer token.
//!
//! Errors are sorted into what the loop can do about them: a network fault is retried, an
//! untrusted server is never talked to again in this run (a rogue DHCP answer must not get
//! a device to image itself), an HTTP refusal carries the server's message.

use std::path::Path;
use std::time::Duration;

use protocol::ErrorReply;
use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

/// Why a request failed.
#[derive(Debug)]
pub enum ClientError {
    /// No connection, timeout, connection reset: worth retrying.
    Network(String),
    /// The server's certificate is not from our CA (or TLS failed): never retried.
    Untrusted(String),
    /// The server answered with an error status.
    Http { status: u16, message: String },
    /// The server's answer is not what protocol v1 says.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Network(m) => write!(f, "network error: {m}"),
            ClientError::Untrusted(m) => write!(f, "server not trusted: {m}"),
            ClientError::Http { status, message } => {
                write!(f, "server answered HTTP {status}: {message}")
            }
            ClientError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Network(_) => true,
            // A server restarting behind a proxy, or overloaded.
            ClientError::Http { status, .. } => matches!(status, 502..=504 | 500 | 429),
            _ => false,
        }
    }
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

/// The agent for talking to the server: only the given CA is trusted when one is given
/// (the server's private CA from `imgserver init`); otherwise the system's web PKI.
pub fn http_agent(ca: Option<&Path>, timeout: Duration) -> anyhow::Result<ureq::Agent> {
    let mut tls = TlsConfig::builder().provider(TlsProvider::Rustls);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca)
            .map_err(|e| anyhow::anyhow!("reading the server CA {}: {e}", ca.display()))?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            anyhow::bail!(
                "{} holds no PEM certificate: copy the ca.pem that `imgserver init` printed",
                ca.display()
            );
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    let t = Some(timeout);
    let config = ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        // The protocol has no redirects: following one would carry the credential (and the
        // device's inventory) to wherever the answer points. A 3xx is an error answer.
        .max_redirects(0)
        .timeout_connect(t)
        .timeout_recv_response(t)
        .timeout_per_read(t)
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

fn transport(url: &str, e: ureq::Error) -> ClientError {
    match e {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => ClientError::Untrusted(format!(
            "{url}: {e}. The server did not prove a certificate from this device's CA: if it is really yours, copy its ca.pem to the device"
        )),
        other => {
            let text = other.to_string();
            // ureq reports certificate failures from rustls as I/O errors in some paths.
            if text.contains("certificate") || text.contains("UnknownIssuer") || text.contains("InvalidCertificate") {
                ClientError::Untrusted(format!("{url}: {text}"))
            } else {
                ClientError::Network(format!("{url}: {text}"))
            }
        }
    }
}

impl Client {
    pub fn new(base: &str, ca: Option<&Path>, timeout: Duration) -> anyhow::Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            anyhow::bail!("server URL {base:?} must start with https:// or http://");
        }
        Ok(Client {
            base,
            agent: http_agent(ca, timeout)?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// POST `body` as JSON to `path`, parse the JSON answer.
    pub fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &B,
    ) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let text = serde_json::to_string(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.send(text).map_err(|e| transport(&url, e))?;
        Self::answer(&url, resp)
    }

    /// GET `path` and parse the JSON answer (`GET /api/v1/tasks/{id}`; the loop itself only
    /// POSTs, the end-to-end suite reads tasks with it).
    #[allow(dead_code)]
    pub fn get<R: DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url);
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| transport(&url, e))?;
        Self::answer(&url, resp)
    }

    fn answer<R: DeserializeOwned>(
        url: &str,
        resp: ureq::http::Response<ureq::Body>,
    ) -> Result<R, ClientError> {
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| ClientError::Network(format!("{url}: reading the answer: {e}")))?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ErrorReply>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| body.trim().chars().take(300).collect());
            return Err(ClientError::Http { status, message });
        }
        serde_json::from_str(&body).map_err(|e| {
            ClientError::Protocol(format!(
                "{url}: {e} (protocol v{} expected)",
                protocol::PROTOCOL_VERSION
            ))
        })
    }
}
