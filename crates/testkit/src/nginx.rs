//! A real nginx (Debian's) in the foreground on a free loopback port, as the reference for rate-limit parity.
//! The test gives the `http {}` block's limit zones and the `server {}` block's locations; a static file
//! `{prefix}/www/x` is the content (`return` would answer before `limit_req` runs, in the rewrite phase).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::Service;

pub struct Nginx {
    pub port: u16,
    service: Service,
    _dir: TempDir,
}

impl Drop for Nginx {
    /// SIGTERM (nginx's fast shutdown) so that the master stops its worker: a SIGKILL to the master alone, as
    /// [`Service`]'s drop would send, leaves the worker running as an orphan.
    fn drop(&mut self) {
        let _ = self.service.stop_with(libc::SIGTERM, Duration::from_secs(5));
    }
}

impl Nginx {
    /// Starts nginx with HTTPS (`cert`, `key`) on a free port. `http` goes into `http {}`, `locations` into
    /// `server {}`; `/warmup` is always there and unlimited.
    pub async fn start(http: &str, locations: &str, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("testkit-nginx-").tempdir()?;
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("x"), "ok\n")?;
        let port = crate::free_port();
        let p = dir.path().display();
        let conf = format!(
            "user root;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
               fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
               {http}\n\
               server {{\n    listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
                 root {www};\n    location = /warmup {{ try_files /x =404; }}\n    {locations}\n  }}\n}}\n",
            cert = cert.display(),
            key = key.display(),
            www = www.display(),
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let nginx = nginx_bin();
        let conf_arg = conf_path.display().to_string();
        let prefix_arg = format!("{p}/");
        let service = Service::spawn(
            "nginx",
            &nginx,
            &["-p", &prefix_arg, "-c", &conf_arg, "-g", "daemon off;"],
            &[],
            dir.path(),
        )?;
        crate::wait_listening(port, Duration::from_secs(10), "nginx to listen").await?;
        Ok(Self { port, service, _dir: dir })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

fn nginx_bin() -> PathBuf {
    std::env::var("NGINX_BIN").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/sbin/nginx"))
}
