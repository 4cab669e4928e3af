//! Alert mail: the message as the outbox keeps it, and delivery through the configured relay.

use lettre::message::Body;
use lettre::message::Mailbox;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

/// The SMTP relay alerts are sent through.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smtp {
    /// The relay's host name or address.
    pub host: String,
    /// Its port; by default 25 without TLS, 587 with STARTTLS, 465 with implicit TLS.
    pub port: Option<u16>,
    /// none, starttls or tls.
    #[serde(default)]
    pub tls: SmtpTls,
    /// The user to authenticate as, if any.
    pub user: Option<String>,
    /// A file holding the password (first line), readable by the daemon only.
    pub password_file: Option<PathBuf>,
    /// The From address, e.g. `stately <stately@example.com>`.
    pub from: String,
    /// Extra CA certificates (PEM) to trust for the relay's TLS.
    pub ca_file: Option<PathBuf>,
    /// How long one connection attempt or command may take.
    #[serde(default = "default_smtp_timeout", with = "crate::human_time")]
    pub timeout: Duration,
    /// The longest wait between two delivery attempts of a message.
    #[serde(default = "default_smtp_retry_max", with = "crate::human_time")]
    pub retry_max: Duration,
}

impl fmt::Debug for Smtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smtp")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (loopback relays only, really).
    None,
    /// STARTTLS, required.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

fn default_smtp_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_smtp_retry_max() -> Duration {
    Duration::from_secs(300)
}

impl Smtp {
    /// Checks what the schema alone cannot: a host, a From address, sane timeouts,
    /// credentials given together.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.host.trim().is_empty() {
            return Err("smtp: host is empty".into());
        }
        if let Err(e) = self.from.parse::<lettre::message::Mailbox>() {
            return Err(format!(
                "smtp: from '{}' is not a mail address: {e}",
                self.from
            ));
        }
        if self.timeout < Duration::from_millis(100) || self.retry_max < Duration::from_millis(100)
        {
            return Err("smtp: timeout and retry_max are at least 100ms".into());
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err("smtp: user and password_file go together (give both or neither)".into());
        }
        Ok(())
    }
}

/// A message as the outbox stores it: everything needed to send it again, identically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mail {
    /// Recipients.
    pub to: Vec<String>,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
    /// The Message-ID, the same on every attempt, so a receiver can spot a repeat.
    pub message_id: String,
    /// Unix milliseconds, the Date header.
    pub date_ms: i64,
}

/// How a delivery attempt failed.
#[derive(Debug)]
pub(crate) struct SendError {
    /// The relay refused the message for good (a 5xx reply): do not retry.
    pub(crate) permanent: bool,
    pub(crate) message: String,
}

/// Where a delivery over statelyd's own connection goes.
struct Direct {
    host: String,
    port: u16,
    /// STARTTLS with these parameters after the greeting.
    starttls: Option<TlsParameters>,
}

/// The relay, ready to send.
pub(crate) struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// A relay without TLS or with STARTTLS: delivered over a connection of our own with
    /// TCP_NODELAY (lettre's sets none, and the final "." of DATA, written alone after the
    /// body, then waits for the relay's delayed ACK: 40 ms per mail on Linux). Implicit TLS
    /// stays with lettre's transport, which alone can wrap a connection before the greeting.
    direct: Option<Direct>,
    /// The relay's credentials, for that connection.
    credentials: Option<Credentials>,
    from: Mailbox,
    /// "host:port (starttls)", for messages.
    pub(crate) relay: String,
    pub(crate) retry_max: Duration,
    /// How long one attempt may take.
    pub(crate) timeout: Duration,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("relay", &self.relay)
            .finish()
    }
}

impl Mailer {
    /// Builds the transport from the daemon's settings (reading the password file).
    pub(crate) fn new(smtp: &Smtp) -> Result<Mailer, String> {
        let port = smtp.port.unwrap_or(match smtp.tls {
            SmtpTls::None => 25,
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
        });
        let mode = match smtp.tls {
            SmtpTls::None => "no TLS",
            SmtpTls::Starttls => "STARTTLS",
            SmtpTls::Tls => "implicit TLS",
        };
        let relay = format!("{}:{port} ({mode})", smtp.host);
        let from: Mailbox = smtp
            .from
            .parse()
            .map_err(|e| format!("smtp: from '{}': {e}", smtp.from))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
            .port(port)
            .timeout(Some(smtp.timeout));
        let mut starttls = None;
        if smtp.tls != SmtpTls::None {
            let mut params = TlsParameters::builder(smtp.host.clone());
            if let Some(ca) = &smtp.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("smtp: cannot read ca_file {}: {e}", ca.display()))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| format!("smtp: ca_file {}: {e}", ca.display()))?;
                params = params.add_root_certificate(cert);
            }
            let params = params
                .build_rustls()
                .map_err(|e| format!("smtp: TLS settings: {e}"))?;
            if smtp.tls == SmtpTls::Starttls {
                starttls = Some(params.clone());
            }
            builder = builder.tls(match smtp.tls {
                SmtpTls::Tls => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        let mut credentials = None;
        if let (Some(user), Some(file)) = (&smtp.user, &smtp.password_file) {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("smtp: cannot read password_file {}: {e}", file.display()))?;
            let password = text.lines().next().unwrap_or("").to_owned();
            if password.is_empty() {
                return Err(format!("smtp: password_file {} is empty", file.display()));
            }
            credentials = Some(Credentials::new(user.clone(), password));
        }
        if let Some(c) = &credentials {
            builder = builder.credentials(c.clone());
        }
        Ok(Mailer {
            transport: builder.build(),
            direct: (smtp.tls != SmtpTls::Tls).then(|| Direct {
                host: smtp.host.clone(),
                port,
                starttls: starttls.clone(),
            }),
            credentials,
            from,
            relay,
            retry_max: smtp.retry_max,
            timeout: smtp.timeout,
        })
    }

    /// Connects, greets, secures and authenticates as a delivery would, then quits.
    pub(crate) async fn check(&self) -> Result<(), String> {
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "the SMTP relay {} did not accept a connection",
                self.relay
            )),
            Err(e) => Err(format!("the SMTP relay {}: {}", self.relay, describe(&e))),
        }
    }

    /// One delivery attempt; on success, the relay's reply.
    pub(crate) async fn send(&self, mail: &Mail) -> Result<String, SendError> {
        let message = self.message(mail).map_err(|message| SendError {
            permanent: true,
            message,
        })?;
        let sent = match &self.direct {
            Some(d) => self.send_direct(d, &message).await,
            None => self.transport.send(message).await.map_err(|e| SendError {
                permanent: e.is_permanent(),
                message: describe(&e),
            }),
        };
        crate::metrics::mail_sent(sent.is_ok());
        match sent {
            Ok(reply) => Ok(format!(
                "{} {}",
                reply.code(),
                reply.message().collect::<Vec<_>>().join(" ")
            )),
            Err(e) => Err(e),
        }
    }

    /// One delivery as lettre's transport makes it (EHLO, STARTTLS and EHLO again when asked,
    /// AUTH when configured, MAIL, RCPT, DATA, QUIT), on a socket with TCP_NODELAY.
    async fn send_direct(
        &self,
        d: &Direct,
        message: &Message,
    ) -> Result<lettre::transport::smtp::response::Response, SendError> {
        let (host, port) = (d.host.as_str(), d.port);
        use lettre::transport::smtp::client::AsyncSmtpConnection;
        use lettre::transport::smtp::extension::ClientId;
        let transient = |message: String| SendError {
            permanent: false,
            message,
        };
        let smtp = |e: lettre::transport::smtp::Error| SendError {
            permanent: e.is_permanent(),
            message: describe(&e),
        };
        let connect = async {
            let stream = tokio::net::TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        let stream = match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(transient(format!("Connection error: {e}"))),
            Err(_) => return Err(transient("Connection error: connection timed out".into())),
        };
        let exchange = async {
            let mut conn =
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &ClientId::default())
                    .await
                    .map_err(smtp)?;
            if let Some(params) = &d.starttls {
                conn.starttls(params.clone(), &ClientId::default())
                    .await
                    .map_err(smtp)?;
            }
            if let Some(credentials) = &self.credentials {
                conn.auth(
                    &[
                        lettre::transport::smtp::authentication::Mechanism::Plain,
                        lettre::transport::smtp::authentication::Mechanism::Login,
                    ],
                    credentials,
                )
                .await
                .map_err(smtp)?;
            }
            let reply = conn
                .send(message.envelope(), &message.formatted())
                .await
                .map_err(smtp)?;
            let _ = conn.quit().await;
            Ok(reply)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(transient("the relay did not answer in time".into())),
        }
    }

    fn message(&self, mail: &Mail) -> Result<Message, String> {
        let mut m = Message::builder()
            .from(self.from.clone())
            .subject(mail.subject.clone())
            .message_id(Some(mail.message_id.clone()))
            .date(UNIX_EPOCH + Duration::from_millis(mail.date_ms.max(0) as u64))
            .header(ContentType::TEXT_PLAIN);
        for to in &mail.to {
            let mbox: Mailbox = to
                .parse()
                .map_err(|e| format!("recipient '{to}' is not a mail address: {e}"))?;
            m = m.to(mbox);
        }
        // Plain 7-bit text when it is ASCII with lines under SMTP's limit, so the message
        // reads as written; otherwise lettre picks an encoding.
        let crlf = mail.body.replace("\r\n", "\n").replace('\n', "\r\n");
        let plain = crlf.is_ascii()
            && !crlf.contains('\0')
            && crlf
                .split("\r\n")
                .all(|l| l.len() < 990 && !l.contains('\r'));
        let body = if plain {
            Body::dangerous_pre_encoded(crlf.into_bytes(), ContentTransferEncoding::SevenBit)
        } else {
            Body::new(mail.body.clone())
        };
        m.body(body).map_err(|e| e.to_string())
    }
}

/// lettre's error with its causes, on one line.
fn describe(e: &lettre::transport::smtp::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Checks a recipient list as a job gives it.
pub(crate) fn check_recipients(to: &[String]) -> Result<(), String> {
    if to.is_empty() {
        return Err("at least one recipient (--to) is needed".into());
    }
    if to.len() > 50 {
        return Err(format!("at most 50 recipients, not {}", to.len()));
    }
    for r in to {
        r.parse::<Mailbox>().map_err(|e| {
            format!(
                "recipient {} is not a mail address: {e}",
                crate::quote::quote(r)
            )
        })?;
    }
    Ok(())
}
