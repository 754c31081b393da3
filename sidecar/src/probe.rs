//! `cqrs-sidecar probe URL`: a container's healthcheck without curl in the image. One HTTP GET
//! of a plain `http://host:port/path` URL (the admin port's `/readyz` or `/healthz`); exit code
//! 0 on a 200, 1 otherwise, the status line and body on stdout for `docker inspect`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// What a probe URL is made of.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

fn target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs can be probed (the admin port)"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("{url:?}: {port:?} is not a port"))?,
        ),
        None => (authority, 80),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(Target {
        host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port,
        path: if path.is_empty() {
            "/".to_owned()
        } else {
            path.to_owned()
        },
    })
}

fn get(target: &Target, timeout: Duration) -> Result<(bool, String), String> {
    let address = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|err| format!("resolving {}: {err}", target.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", target.host))?;
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|err| format!("connecting to {address}: {err}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|err| err.to_string())?;
    // one write: a server that answers after its first read gets the whole request
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        target.path, target.host
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|err| format!("sending the request: {err}"))?;
    let mut response = Vec::new();
    // a probe reads a short answer; a longer one is cut, never held whole
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(|err| format!("reading the answer: {err}"))?;
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or_default();
    let ok = status.split_whitespace().nth(1) == Some("200");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    Ok((ok, format!("{status}\n{}", body.trim_end())))
}

/// Runs the probe: exit code 0 when `url` answers 200 within `timeout`.
pub fn run(url: &str, timeout: Duration) -> ExitCode {
    match target(url).and_then(|t| get(&t, timeout)) {
        Ok((ok, answer)) => {
            println!("{answer}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(reason) => {
            println!("probe failed: {reason}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_as_host_port_and_path() {
        assert_eq!(
            target("http://127.0.0.1:9188/readyz").unwrap(),
            Target {
                host: "127.0.0.1".into(),
                port: 9188,
                path: "/readyz".into()
            }
        );
        assert_eq!(target("http://sidecar").unwrap().port, 80);
        assert_eq!(target("http://[::1]:9188").unwrap().host, "::1");
        assert_eq!(target("http://[::1]:9188").unwrap().path, "/");
        assert!(target("https://x/readyz").is_err());
        assert!(target("http://:9188/").is_err());
        assert!(target("http://x:port/").is_err());
    }

    #[test]
    fn a_200_passes_and_anything_else_fails() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for answer in [
                "200 OK\r\n\r\nleader, streaming\n",
                "503 Service Unavailable\r\n\r\nstarting\n",
            ] {
                let (mut socket, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut chunk = [0u8; 256];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = socket.read(&mut chunk).unwrap();
                    assert!(n > 0, "the request ended early");
                    request.extend_from_slice(&chunk[..n]);
                }
                write!(socket, "HTTP/1.1 {answer}").unwrap();
            }
        });
        let at = Target {
            host: "127.0.0.1".into(),
            port,
            path: "/readyz".into(),
        };
        let (ok, answer) = get(&at, Duration::from_secs(2)).unwrap();
        assert!(ok && answer.ends_with("leader, streaming"), "{answer}");
        let (ok, answer) = get(&at, Duration::from_secs(2)).unwrap();
        assert!(!ok && answer.starts_with("HTTP/1.1 503"), "{answer}");
        server.join().unwrap();
    }
}
