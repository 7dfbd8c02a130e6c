//! A minimal HTTP/1.1 client over `std::net`: one POST per connection (`Connection: close`),
//! bodies framed by `Content-Length`, chunked transfer encoding or the connection's end. It is
//! all the agent needs to reach the llm-gateway over plain http on the job network, and it keeps
//! the static binary small (no TLS, no async runtime).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("unsupported URL {0:?}: only http://host[:port][/path] is supported")]
    Url(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("i/o error talking to {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("malformed HTTP answer from {addr}: {what}")]
    Malformed { addr: String, what: String },
}

/// `http://host:port/prefix`, split once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub host: String,
    pub port: u16,
    /// The path prefix without a trailing slash (`""` or `/openai/v1`).
    pub path: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let bad = || HttpError::Url(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() || authority.contains('@') || path.contains(['?', '#']) {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal without a port ends in `]`.
            Some((host, port)) if !port.ends_with(']') => {
                (host, port.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: path.trim_end_matches('/').to_owned(),
        })
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// An answer whose body is read as it arrives.
pub struct Response {
    pub status: u16,
    pub content_type: String,
    /// `Retry-After` in seconds, when the server sent one.
    pub retry_after: Option<u64>,
    pub body: BufReader<Body>,
}

/// Sends `POST {base.path}{path}` with a JSON `body`; `timeout` bounds the connect and every
/// read and write (a model may think for a while before its first byte).
pub fn post_json(
    base: &BaseUrl,
    path: &str,
    bearer: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Response, HttpError> {
    let addr = base.addr();
    let io_err = |source| HttpError::Io {
        addr: addr.clone(),
        source,
    };
    let stream = connect(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    // Request and body leave in one write; no Nagle delay on the small requests.
    let _ = stream.set_nodelay(true);
    let mut request = format!(
        "POST {}{path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\nUser-Agent: flotilla-agent\r\n\r\n",
        base.path,
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    (&stream).write_all(&request).map_err(io_err)?;
    read_head(stream, &addr)
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, HttpError> {
    let connect_err = |source| HttpError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for candidate in addr.to_socket_addrs().map_err(connect_err)? {
        match TcpStream::connect_timeout(&candidate, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(connect_err(last))
}

fn read_head(stream: TcpStream, addr: &str) -> Result<Response, HttpError> {
    let malformed = |what: &str| HttpError::Malformed {
        addr: addr.to_owned(),
        what: what.to_owned(),
    };
    let io_err = |source| HttpError::Io {
        addr: addr.to_owned(),
        source,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io_err)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| malformed("no status line"))?;
    let mut content_type = String::new();
    let mut retry_after = None;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(io_err)? == 0 {
            return Err(malformed("the headers never ended"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(malformed("a header without a colon"));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-type" => value.clone_into(&mut content_type),
            "retry-after" => retry_after = value.parse().ok(),
            "content-length" => {
                length = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| malformed("bad Content-Length"))?,
                );
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked {
            left: 0,
            done: false,
        },
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Close,
    };
    Ok(Response {
        status,
        content_type,
        retry_after,
        body: BufReader::new(Body {
            inner: reader,
            framing,
        }),
    })
}

enum Framing {
    Length(u64),
    /// `left` bytes remain of the current chunk.
    Chunked {
        left: u64,
        done: bool,
    },
    Close,
}

/// A response body with its framing removed.
pub struct Body {
    inner: BufReader<TcpStream>,
    framing: Framing,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.framing {
            Framing::Close => self.inner.read(buf),
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    *left = chunk_size(&mut self.inner)?;
                    if *left == 0 {
                        *done = true;
                        return Ok(0);
                    }
                }
                let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                *left -= n as u64;
                if *left == 0 {
                    // Each chunk ends with CRLF.
                    let mut crlf = String::new();
                    self.inner.read_line(&mut crlf)?;
                }
                Ok(n)
            }
        }
    }
}

/// Reads a chunk-size line (`1a;ext=1\r\n`).
fn chunk_size(reader: &mut impl BufRead) -> io::Result<u64> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let hex = line.trim().split(';').next().unwrap_or_default();
    u64::from_str_radix(hex, 16)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn base_urls() {
        let url = BaseUrl::parse("http://172.18.0.1:8421/openai/v1/").unwrap();
        assert_eq!(url.host, "172.18.0.1");
        assert_eq!(url.port, 8421);
        assert_eq!(url.path, "/openai/v1");
        assert_eq!(BaseUrl::parse("http://gw").unwrap().port, 80);
        assert!(BaseUrl::parse("https://api.openai.com/v1").is_err());
        assert!(BaseUrl::parse("http://:80").is_err());
        assert!(BaseUrl::parse("http://h:x").is_err());
    }

    /// Serves one canned answer to one connection; returns the request it read.
    fn serve_once(answer: &'static str) -> (BaseUrl, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = n.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            stream.write_all(answer.as_bytes()).unwrap();
            head + &String::from_utf8(body).unwrap()
        });
        let base = BaseUrl::parse(&format!("http://127.0.0.1:{port}/p")).unwrap();
        (base, handle)
    }

    fn body_of(answer: &'static str) -> (u16, String, String) {
        let (base, server) = serve_once(answer);
        let mut response = post_json(&base, "/x", "tok", b"{}", Duration::from_secs(5)).unwrap();
        let mut body = String::new();
        response.body.read_to_string(&mut body).unwrap();
        (response.status, body, server.join().unwrap())
    }

    #[test]
    fn reads_each_framing() {
        let (status, body, request) =
            body_of("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello trailing");
        assert_eq!((status, body.as_str()), (200, "hello"));
        assert!(request.starts_with("POST /p/x HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("Authorization: Bearer tok\r\n"));
        assert!(request.ends_with("\r\n\r\n{}"));
        let (_, body, _) = body_of(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n",
        );
        assert_eq!(body, "hello, world");
        let (status, body, _) = body_of("HTTP/1.1 402 Payment Required\r\n\r\nspent");
        assert_eq!((status, body.as_str()), (402, "spent"));
    }
}
