//! `devkit`: writes the local stack's dev credentials, and mints tokens on demand.
//!
//! `devkit init --dir .stack` keeps an existing key (so tokens stay valid across restarts), writes
//! `dev-signing-key.pem`, `jwks.json` and a fresh `token` with both order roles.
//! `devkit token --dir .stack [--ttl 3600] [--sub alice]` prints a new token signed by that key.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use devkit::{Claims, SigningKey, jwks};

#[derive(Parser)]
#[command(about = "Development credentials for the local stack (never for production)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Common {
    /// Where the key, the JWKS and the token live.
    #[arg(long, default_value = ".stack")]
    dir: PathBuf,
    #[arg(long, env = "GATEWAY_AUTH__ISSUER", default_value = "http://127.0.0.1:8080/dev-realm")]
    issuer: String,
    #[arg(long, env = "GATEWAY_AUTH__AUDIENCE", default_value = "orders-api")]
    audience: String,
    /// Lifetime of the token, in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: u64,
    #[arg(long, default_value = "dev-user")]
    sub: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create (or keep) the key, write the JWKS and a fresh token.
    Init(Common),
    /// Print a new token signed by the existing key.
    Token(Common),
}

const KEY_FILE: &str = "dev-signing-key.pem";
const KID_FILE: &str = "dev-signing-key.kid";

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Init(c) => {
            fs::create_dir_all(&c.dir).with_context(|| format!("creating {}", c.dir.display()))?;
            let key = load_or_create(&c.dir)?;
            let jwks_path = c.dir.join("jwks.json");
            fs::write(&jwks_path, serde_json::to_vec_pretty(&jwks(&[&key]))?)
                .with_context(|| format!("writing {}", jwks_path.display()))?;
            let token = key.sign(&Claims::new(&c.issuer, &c.audience, &c.sub, c.ttl))?;
            let token_path = c.dir.join("token");
            fs::write(&token_path, &token).with_context(|| format!("writing {}", token_path.display()))?;
            println!("{}", token_path.display());
        }
        Cmd::Token(c) => {
            let key = load(&c.dir)?;
            println!("{}", key.sign(&Claims::new(&c.issuer, &c.audience, &c.sub, c.ttl))?);
        }
    }
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<SigningKey> {
    let pem = fs::read(dir.join(KEY_FILE)).with_context(|| format!("reading {}", dir.join(KEY_FILE).display()))?;
    let kid = fs::read_to_string(dir.join(KID_FILE)).context("reading the key id")?;
    Ok(SigningKey::from_pem(kid.trim(), &pem)?)
}

fn load_or_create(dir: &Path) -> anyhow::Result<SigningKey> {
    if dir.join(KEY_FILE).is_file() && dir.join(KID_FILE).is_file() {
        return load(dir);
    }
    let key = SigningKey::generate()?;
    write_private(&dir.join(KEY_FILE), key.private_pem())?;
    fs::write(dir.join(KID_FILE), &key.kid).context("writing the key id")?;
    Ok(key)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
