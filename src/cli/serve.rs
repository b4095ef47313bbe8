//! `ggrun serve`'s flags, turned into the server's options ([`crate::serve::Options`]).

use clap::Args;

use super::common::ModelArgs;

#[derive(Args, Debug)]
#[command(next_help_heading = "Server")]
pub struct ServeArgs {
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences served at once (slots, each with its own state of -c tokens): their decode
    /// steps run batched, one pass over the weights for all; more requests wait in order.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub parallel: usize,
    /// Requests must carry `Authorization: Bearer KEY` (or `x-api-key: KEY`); /health and
    /// /v1/models stay public for probes and discovery unless --api-key-all-routes.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_key: Option<String>,
    /// With --api-key: /health and /v1/models need the key too.
    #[arg(long = "api-key-all-routes")]
    pub api_key_all_routes: bool,
    /// Largest request body in bytes.
    #[arg(long = "max-body", default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Snapshot the state every N prompt tokens of a long prefill (0: only at prompt ends), so
    /// later prompts sharing that start resume there.
    #[arg(long = "snapshot-every", default_value_t = 1024)]
    pub snapshot_every: usize,
    /// Snapshots kept (0: none; the state itself is still reused when a prompt extends it).
    #[arg(long = "snapshots", default_value_t = 4)]
    pub snapshots: usize,
    /// Open connections at most (default: 1024, or fewer where the open-file limit is lower);
    /// beyond it a new connection closes the one idle the longest, or gets a 503 when all are
    /// busy.
    #[arg(long = "max-connections", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers (from its first byte), and as many
    /// for its body.
    #[arg(long = "header-timeout", value_name = "SECS", default_value_t = 15)]
    pub header_timeout: u64,
    /// Seconds a connection may stay open with no request in flight.
    #[arg(long = "idle-timeout", value_name = "SECS", default_value_t = 60)]
    pub idle_timeout: u64,
    #[command(flatten)]
    pub model: ModelArgs,
}

impl ServeArgs {
    /// The server's options.
    pub fn options(&self) -> anyhow::Result<crate::serve::Options> {
        self.model.no_words()?;
        Ok(crate::serve::Options {
            model: self.model.options()?,
            host: self.host.clone(),
            port: self.port,
            parallel: self.parallel,
            api_key: self.api_key.clone(),
            auth_all: self.api_key_all_routes,
            max_body: self.max_body,
            snapshot_every: self.snapshot_every,
            snapshots: self.snapshots,
            max_connections: self.max_connections,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
        })
    }
}
