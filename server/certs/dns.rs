//! DNS-01 through RFC 2136 dynamic updates signed with TSIG (RFC 8945): the standard every
//! authoritative server speaks (BIND, Knot, PowerDNS). Messages, TSIG signing and verification
//! come from hickory-proto; the exchange itself (one TCP request for an update, UDP queries
//! with a TCP retry when truncated) is a few lines here, because hickory's clients pull in a
//! runtime of their own and its update client is not released.
//!
//! A `[[dns]]` provider names the primary that accepts updates for a zone, the TSIG key (a
//! BIND key file, as `tsig-keygen` writes it), and where the zone's authoritative servers
//! are: by default the zone's NS records, asked of the primary. A job waits until every one
//! of them answers the challenge record, not a fixed time.

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::{Name, RData, Record, RecordSet, RecordType, TSigner};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One exchange with a DNS server gives up after this long.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// A DNS zone statelyd may publish challenge records in.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsProvider {
    /// What the logs call it.
    pub name: String,
    /// The zone, e.g. `example.com`: challenge records for names in it go here.
    pub zone: String,
    /// The primary that accepts dynamic updates for the zone: `IP` or `IP:port`.
    pub server: String,
    /// A BIND key file (`key "name" { algorithm hmac-sha256; secret "..."; };`).
    pub tsig_key_file: PathBuf,
    /// The authoritative servers to wait on (`IP` or `IP:port`); default: the zone's NS
    /// records, asked of `server`, on `nameserver_port`.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// The port the NS hosts answer on when found from the NS records.
    #[serde(default = "default_port")]
    pub nameserver_port: u16,
    /// The challenge records' TTL.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// How long to wait for every authoritative server to answer the record.
    #[serde(default = "default_wait", with = "crate::human_time")]
    pub propagation_timeout: Duration,
}

fn default_port() -> u16 {
    53
}

fn default_ttl() -> u32 {
    60
}

fn default_wait() -> Duration {
    Duration::from_secs(180)
}

/// Where a record is changed: what an undo entry keeps (never the secret, only its file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Zone {
    pub(crate) server: SocketAddr,
    pub(crate) zone: String,
    pub(crate) key_file: PathBuf,
}

/// A TSIG key as BIND keeps it.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) name: String,
    pub(crate) algorithm: TsigAlgorithm,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Parses a BIND key file: the first `key "NAME" { algorithm ALG; secret "BASE64"; };`.
pub(crate) fn parse_key(text: &str) -> Result<Key, String> {
    // Comments as BIND writes them: `#`, `//` and `/* */`, outside quoted strings (a
    // base64 secret may hold `//`: one in 100 random keys does).
    let text = regex::Regex::new(r#"(?s)"[^"]*"|/\*.*?\*/|//[^\n]*|#[^\n]*"#)
        .expect("a valid pattern")
        .replace_all(text, |c: &regex::Captures| {
            let m = &c[0];
            if m.starts_with('"') {
                m.to_owned()
            } else {
                String::new()
            }
        });
    let re = regex::Regex::new(r#"(?s)key\s+"?([A-Za-z0-9._-]+)"?\s*\{(.*?)\}\s*;"#)
        .expect("a valid pattern");
    let c = re
        .captures(&text)
        .ok_or("no `key \"NAME\" { ... };` block (the format tsig-keygen writes)")?;
    let name = c[1].to_owned();
    let body = &c[2];
    let field = |f: &str| {
        regex::Regex::new(&format!(r#"{f}\s+"?([^";\s]+)"?\s*;"#))
            .expect("a valid pattern")
            .captures(body)
            .map(|c| c[1].to_owned())
    };
    let alg = field("algorithm").ok_or(format!("key {name}: no algorithm"))?;
    let algorithm = match alg.to_ascii_lowercase().as_str() {
        "hmac-sha256" => TsigAlgorithm::HmacSha256,
        "hmac-sha384" => TsigAlgorithm::HmacSha384,
        "hmac-sha512" => TsigAlgorithm::HmacSha512,
        other => {
            return Err(format!(
                "key {name}: algorithm {other} is not supported (hmac-sha256, hmac-sha384 or hmac-sha512)"
            ));
        }
    };
    use base64::Engine;
    let secret = field("secret").ok_or(format!("key {name}: no secret"))?;
    let secret = base64::engine::general_purpose::STANDARD
        .decode(secret)
        .map_err(|e| format!("key {name}: the secret is not base64: {e}"))?;
    if secret.is_empty() {
        return Err(format!("key {name}: the secret is empty"));
    }
    Ok(Key {
        name,
        algorithm,
        secret,
    })
}

/// Reads a key file.
pub(crate) fn read_key(path: &Path) -> Result<Key, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("the TSIG key file {}: {e}", path.display()))?;
    parse_key(&text).map_err(|e| format!("the TSIG key file {}: {e}", path.display()))
}

/// `IP` or `IP:port` (port 53 by default).
pub(crate) fn parse_server(s: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| format!("'{s}' is not an address like 192.0.2.53 or 192.0.2.53:5353"))
}

/// Lower case, no trailing dot.
fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `name` is `zone` or beneath it.
pub(crate) fn in_zone(name: &str, zone: &str) -> bool {
    let (n, z) = (norm(name), norm(zone));
    n == z || n.ends_with(&format!(".{z}"))
}

/// The provider whose zone holds `name`'s challenge record: the longest zone that contains it.
pub(crate) fn provider_for<'a>(
    providers: &'a [DnsProvider],
    name: &str,
) -> Option<&'a DnsProvider> {
    let record = challenge_name(name);
    providers
        .iter()
        .filter(|p| in_zone(&record, &p.zone))
        .max_by_key(|p| norm(&p.zone).len())
}

/// `_acme-challenge.<name>`; a wildcard's record is its base name's.
pub(crate) fn challenge_name(name: &str) -> String {
    format!(
        "_acme-challenge.{}",
        norm(name.strip_prefix("*.").unwrap_or(name))
    )
}

/// Checks what the schema alone cannot.
pub(crate) fn check(providers: &[DnsProvider]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for p in providers {
        let who = format!("dns '{}'", p.name);
        if !crate::fsops::is_safe_name(&p.name) || !names.insert(p.name.clone()) {
            return Err(format!(
                "{who}: a unique name of letters, digits, '-', '_', '.'"
            ));
        }
        fqdn(&p.zone).map_err(|e| format!("{who}: zone {e}"))?;
        parse_server(&p.server, 53).map_err(|e| format!("{who}: server {e}"))?;
        for n in &p.nameservers {
            parse_server(n, 53).map_err(|e| format!("{who}: nameserver {e}"))?;
        }
        if !p.tsig_key_file.is_absolute() {
            return Err(format!("{who}: tsig_key_file must be an absolute path"));
        }
        read_key(&p.tsig_key_file).map_err(|e| format!("{who}: {e}"))?;
        if p.propagation_timeout.is_zero() {
            return Err(format!("{who}: propagation_timeout must be more than 0s"));
        }
    }
    Ok(())
}

fn fqdn(name: &str) -> Result<Name, String> {
    let mut n = Name::from_ascii(norm(name)).map_err(|e| format!("'{name}': {e}"))?;
    n.set_fqdn(true);
    Ok(n)
}

impl DnsProvider {
    /// Where its updates go.
    pub(crate) fn zone(&self) -> Result<Zone, String> {
        Ok(Zone {
            server: parse_server(&self.server, 53)?,
            zone: norm(&self.zone),
            key_file: self.tsig_key_file.clone(),
        })
    }
}

/// Adds a TXT record (other values at the name stay: a wildcard and its apex share one).
pub(crate) async fn add_txt(z: &Zone, name: &str, value: &str, ttl: u32) -> Result<(), String> {
    let rrset = txt_set(name, value, ttl)?;
    check_in_zone(z, name)?;
    let msg = update_message::append(rrset, fqdn(&z.zone)?, false, false);
    update(z, msg, &format!("adding TXT {name}")).await
}

/// Removes one TXT value; removing one that is not there is no error (RFC 2136 ignores it).
pub(crate) async fn remove_txt(z: &Zone, name: &str, value: &str) -> Result<(), String> {
    let rrset = txt_set(name, value, 0)?;
    check_in_zone(z, name)?;
    let msg = update_message::delete_by_rdata(rrset, fqdn(&z.zone)?, false);
    update(z, msg, &format!("removing TXT {name}")).await
}

fn check_in_zone(z: &Zone, name: &str) -> Result<(), String> {
    if in_zone(name, &z.zone) {
        Ok(())
    } else {
        Err(format!("{name} is not in zone {}", z.zone))
    }
}

fn txt_set(name: &str, value: &str, ttl: u32) -> Result<RecordSet, String> {
    let n = fqdn(name)?;
    let mut set = RecordSet::with_ttl(n.clone(), RecordType::TXT, ttl);
    set.insert(
        Record::from_rdata(n, ttl, RData::TXT(TXT::new(vec![value.to_owned()]))),
        0,
    );
    Ok(set)
}

/// Signs and sends an update to the zone's primary over TCP, and checks its answer: its
/// signature and its code, in the server's words when it refuses.
async fn update(z: &Zone, mut msg: Message, what: &str) -> Result<(), String> {
    let key = {
        let f = z.key_file.clone();
        tokio::task::spawn_blocking(move || read_key(&f))
            .await
            .map_err(|e| e.to_string())??
    };
    let signer = TSigner::new(
        key.secret.clone(),
        key.algorithm.clone(),
        Name::from_ascii(&key.name).map_err(|e| format!("key name {}: {e}", key.name))?,
        300,
    )
    .map_err(|e| format!("TSIG key {}: {e}", key.name))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut verifier = msg
        .finalize(&signer, now)
        .map_err(|e| format!("signing the update: {e}"))?;
    let bytes = msg
        .to_vec()
        .map_err(|e| format!("encoding the update: {e}"))?;
    let answer = exchange_tcp(z.server, &bytes)
        .await
        .map_err(|e| format!("{what}: the DNS server {} {e}", z.server))?;
    let reply = Message::from_vec(&answer)
        .map_err(|e| format!("{what}: {} sent a bad answer: {e}", z.server))?;
    if reply.metadata.id != msg.metadata.id {
        return Err(format!("{what}: {} answered another request", z.server));
    }
    let tsig_error = reply.signature().and_then(|s| s.data.error);
    let code = reply.metadata.response_code;
    if code != ResponseCode::NoError || tsig_error.is_some() {
        let tsig = match tsig_error {
            Some(e) => {
                let why = match e {
                    hickory_proto::rr::rdata::tsig::TsigError::BadSig => {
                        ": the key's secret is not the one the server has"
                    }
                    hickory_proto::rr::rdata::tsig::TsigError::BadKey => {
                        ": the server knows no key by this name and algorithm"
                    }
                    hickory_proto::rr::rdata::tsig::TsigError::BadTime => {
                        ": this machine's clock and the server's differ by more than 5 minutes"
                    }
                    _ => "",
                };
                format!(", TSIG {e:?}{why}")
            }
            None => String::new(),
        };
        let hint = match code {
            ResponseCode::Refused => {
                " (the key may not be allowed to update this zone: allow-update / update-policy)"
            }
            ResponseCode::NotAuth if tsig_error.is_none() => {
                " (the server is not authoritative for the zone)"
            }
            ResponseCode::NotZone => " (the name is not in the zone)",
            _ => "",
        };
        return Err(format!(
            "{what}: the DNS server {} refused the update with key {}: {}{tsig}{hint}",
            z.server, key.name, code
        ));
    }
    if let Some(v) = verifier.as_mut() {
        v.verify(&answer).map_err(|e| {
            format!(
                "{what}: the answer of {} is not signed by key {}: {e}",
                z.server, key.name
            )
        })?;
    }
    Ok(())
}

/// One request and its answer over TCP (two-byte length prefixes).
async fn exchange_tcp(server: SocketAddr, request: &[u8]) -> Result<Vec<u8>, String> {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(server)
            .await
            .map_err(|e| format!("cannot be reached: {e}"))?;
        let _ = s.set_nodelay(true);
        let mut framed = Vec::with_capacity(request.len() + 2);
        framed.extend_from_slice(&(request.len() as u16).to_be_bytes());
        framed.extend_from_slice(request);
        s.write_all(&framed)
            .await
            .map_err(|e| format!("closed the connection: {e}"))?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)
            .await
            .map_err(|e| format!("closed the connection without an answer: {e}"))?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut answer)
            .await
            .map_err(|e| format!("closed the connection mid-answer: {e}"))?;
        Ok(answer)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, go)
        .await
        .map_err(|_| format!("did not answer within {EXCHANGE_TIMEOUT:?}"))?
}

/// A non-recursive query, over UDP, again over TCP when the answer is truncated.
async fn query(server: SocketAddr, name: &str, rtype: RecordType) -> Result<Message, String> {
    let mut msg = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = false;
    msg.add_query(Query::query(fqdn(name)?, rtype));
    let bytes = msg.to_vec().map_err(|e| e.to_string())?;
    let udp = async {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("an address")
        } else {
            "[::]:0".parse().expect("an address")
        };
        let sock = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|e| e.to_string())?;
        sock.connect(server).await.map_err(|e| e.to_string())?;
        sock.send(&bytes).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|e| format!("cannot be reached: {e}"))?;
            // An answer to this question, not a stray or spoofed datagram.
            if let Ok(m) = Message::from_vec(&buf[..n])
                && answers(&msg, &m)
            {
                return Ok::<_, String>(m);
            }
        }
    };
    let reply = tokio::time::timeout(Duration::from_secs(2), udp)
        .await
        .map_err(|_| "did not answer within 2s".to_owned())??;
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    let answer = exchange_tcp(server, &bytes).await?;
    let m = Message::from_vec(&answer).map_err(|e| format!("sent a bad answer: {e}"))?;
    if !answers(&msg, &m) {
        return Err("answered another question".into());
    }
    Ok(m)
}

/// Whether `reply` is the response to `question`: same id, a response, the same question.
fn answers(question: &Message, reply: &Message) -> bool {
    reply.metadata.id == question.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries == question.queries
}

/// The TXT values `server` answers for `name`, as an authority (without recursion).
pub(crate) async fn txt_at(server: SocketAddr, name: &str) -> Result<Vec<String>, String> {
    let reply = query(server, name, RecordType::TXT).await?;
    match reply.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        other => return Err(format!("answered {other}")),
    }
    Ok(reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect())
}

/// The zone's authoritative servers: the configured ones, else its NS hosts (their addresses
/// from the primary's answer, the primary, or this machine's resolver).
pub(crate) async fn authoritative(p: &DnsProvider) -> Result<Vec<SocketAddr>, String> {
    if !p.nameservers.is_empty() {
        return p
            .nameservers
            .iter()
            .map(|n| parse_server(n, p.nameserver_port))
            .collect();
    }
    let primary = parse_server(&p.server, 53)?;
    let reply = query(primary, &p.zone, RecordType::NS)
        .await
        .map_err(|e| format!("asking {primary} for the NS records of {}: {e}", p.zone))?;
    let hosts: Vec<String> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(norm(&ns.0.to_ascii())),
            _ => None,
        })
        .collect();
    if hosts.is_empty() {
        return Err(format!(
            "{primary} has no NS records for {} ({}); set nameservers in [[dns]] '{}'",
            p.zone, reply.metadata.response_code, p.name
        ));
    }
    let mut out = Vec::new();
    for h in &hosts {
        let mut ips: Vec<std::net::IpAddr> = reply
            .additionals
            .iter()
            .filter(|r| norm(&r.name.to_ascii()) == *h)
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        if ips.is_empty() && in_zone(h, &p.zone) {
            for t in [RecordType::A, RecordType::AAAA] {
                if let Ok(m) = query(primary, h, t).await {
                    ips.extend(m.answers.iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
                        _ => None,
                    }));
                }
            }
        }
        if ips.is_empty() {
            ips.extend(
                tokio::net::lookup_host((h.as_str(), p.nameserver_port))
                    .await
                    .map_err(|e| format!("the name server {h} of {}: {e}", p.zone))?
                    .map(|a| a.ip()),
            );
        }
        if ips.is_empty() {
            return Err(format!("the name server {h} of {} has no address", p.zone));
        }
        out.extend(
            ips.into_iter()
                .map(|ip| SocketAddr::new(ip, p.nameserver_port)),
        );
    }
    out.sort();
    out.dedup();
    // An address this machine has no route to (IPv6 on a host without it) cannot be waited
    // on; the CA asks the others as well.
    let reachable: Vec<SocketAddr> = out.iter().copied().filter(|a| routable(*a)).collect();
    if reachable.is_empty() {
        return Err(format!(
            "no route to any name server of {} ({})",
            p.zone,
            out.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(reachable)
}

/// Whether this machine has a route to `addr` (a UDP connect asks the routing table only).
fn routable(addr: SocketAddr) -> bool {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    std::net::UdpSocket::bind(bind)
        .and_then(|s| s.connect(addr))
        .is_ok()
}

/// Waits until every server answers every `(name, value)`, polling each with a short backoff
/// (a record is usually there on the first try). Returns how long it took, or which server
/// lacked what when `timeout` ran out.
pub(crate) async fn wait_published(
    servers: &[SocketAddr],
    records: &[(String, String)],
    timeout: Duration,
) -> Result<Duration, String> {
    let start = tokio::time::Instant::now();
    let mut pending: Vec<(SocketAddr, String, String)> = servers
        .iter()
        .flat_map(|s| records.iter().map(move |(n, v)| (*s, n.clone(), v.clone())))
        .collect();
    let mut delay = Duration::from_millis(10);
    let mut last: std::collections::HashMap<SocketAddr, String> = Default::default();
    loop {
        let checks = pending.iter().map(|(s, n, _)| txt_at(*s, n));
        let got = futures_util::future::join_all(checks).await;
        let mut still = Vec::new();
        for ((s, n, v), r) in pending.into_iter().zip(got) {
            match r {
                Ok(values) if values.contains(&v) => {}
                Ok(values) => {
                    last.insert(
                        s,
                        format!(
                            "{s} answers {} TXT values for {n}, not the challenge's",
                            values.len()
                        ),
                    );
                    still.push((s, n, v));
                }
                Err(e) => {
                    last.insert(s, format!("{s} {e}"));
                    still.push((s, n, v));
                }
            }
        }
        if still.is_empty() {
            return Ok(start.elapsed());
        }
        pending = still;
        if start.elapsed() >= timeout {
            let mut why: Vec<String> = pending
                .iter()
                .filter_map(|(s, _, _)| last.get(s).cloned())
                .collect();
            why.dedup();
            return Err(format!(
                "after {}, not every authoritative server answers the challenge record: {}",
                humantime::format_duration(Duration::from_secs(timeout.as_secs())),
                why.join("; ")
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 3 / 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bind_key_file_parses() {
        let k = parse_key(
            "# made by tsig-keygen\nkey \"stately\" {\n\talgorithm hmac-sha256;\n\tsecret \"fw6FYxYuePD0UfwggjrGufJzFX/1syLTqev3WEnAqzc=\";\n};\n",
        )
        .unwrap();
        assert_eq!(k.name, "stately");
        assert_eq!(k.algorithm, TsigAlgorithm::HmacSha256);
        assert_eq!(k.secret.len(), 32);
        // `//` and `#` inside the quoted secret are not comments; outside they are.
        let k = parse_key(
            "key \"s\" { // a comment\n algorithm hmac-sha256; /* one\nmore */ secret \"ab//cd/+AAA=\"; # last\n};",
        )
        .unwrap();
        assert_eq!(k.secret.len(), 8);
        for (bad, says) in [
            ("nothing", "no `key"),
            (
                "key \"a\" { algorithm hmac-md5; secret \"AAAA\"; };",
                "not supported",
            ),
            (
                "key \"a\" { algorithm hmac-sha256; secret \"***\"; };",
                "not base64",
            ),
            ("key \"a\" { secret \"AAAA\"; };", "no algorithm"),
        ] {
            let e = parse_key(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_longest_zone_holds_the_record() {
        let p = |name: &str, zone: &str| DnsProvider {
            name: name.into(),
            zone: zone.into(),
            server: "127.0.0.1".into(),
            tsig_key_file: "/k".into(),
            nameservers: vec![],
            nameserver_port: 53,
            ttl: 60,
            propagation_timeout: Duration::from_secs(1),
        };
        let ps = [p("outer", "example.com"), p("inner", "shop.example.com.")];
        assert_eq!(provider_for(&ps, "example.com").unwrap().name, "outer");
        assert_eq!(provider_for(&ps, "*.example.com").unwrap().name, "outer");
        assert_eq!(
            provider_for(&ps, "a.shop.example.com").unwrap().name,
            "inner"
        );
        assert_eq!(
            provider_for(&ps, "*.SHOP.example.com").unwrap().name,
            "inner"
        );
        assert!(provider_for(&ps, "example.org").is_none());
        assert!(provider_for(&ps, "notexample.com").is_none());
        assert_eq!(
            challenge_name("*.Example.com."),
            "_acme-challenge.example.com"
        );
    }
}
