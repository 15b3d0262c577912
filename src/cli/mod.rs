//! The operator CLI. Local commands (`init`, `serve`, `config check`,
//! `audit verify`, `dev`) read the config; client commands talk to a running
//! daemon over HTTP with `KEYWARD_URL` and `KEYWARD_TOKEN`.

mod audit;
mod backup;
mod client;
mod dev;
mod enroll;
mod lifecycle;
mod local;
mod migrate;
mod renew;
mod rotation;
mod tokens;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "keyward",
    version,
    about = "Key management daemon for device fleets: HSM-held CA keys, approvals, issuance, audit"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Config file.
    #[arg(
        long,
        env = "KEYWARD_CONFIG",
        default_value = "/etc/keyward/keyward.toml"
    )]
    config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Daemon URL.
    #[arg(
        long,
        env = "KEYWARD_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// PEM CA certificate(s) that sign the daemon's HTTPS certificate (with
    /// `issue = true`: keyward's root, as `keyward dev` prints). When set,
    /// only these are trusted.
    #[arg(long, env = "KEYWARD_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// File holding the admin token (otherwise the KEYWARD_TOKEN environment variable).
    /// Tokens are never taken as a command-line value: argv is visible in `ps`.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database, the CA keys and certificates per policy, and the first admin.
    Init {
        #[command(flatten)]
        config: ConfigArg,
        /// Name of the bootstrap admin created when there is none.
        #[arg(long, default_value = "bootstrap")]
        admin_name: String,
        /// Write the bootstrap admin token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_out: Option<PathBuf>,
    },
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Self-contained demo: SoftHSM2 token, SQLite and config under DIR, then serve.
    Dev {
        #[arg(long, default_value = ".keyward-dev")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Bootstrap tokens and reclaim codes for enrollment groups.
    Tokens {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Policies of a running daemon.
    Policies {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: PoliciesCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Review and decide device registrations.
    Registrations {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: RegistrationsCommand,
    },
    /// Manage admin accounts.
    Admins {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AdminsCommand,
    },
    /// Encrypted backups: make, list, verify (through the daemon); restore
    /// and fetch (locally, with the daemon stopped).
    Backup {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Certificate authorities: CRLs, key rotation.
    Ca {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Devices: list, show, revoke, suspend, resume, allow an early renewal.
    Devices {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// keyward's own keys: rotate an OCSP signer on demand.
    Keys {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Certificates: list, what expires soon, show, revoke (any RFC 5280 reason), release a hold.
    Certs {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Reference device client: make a key and CSR, register, wait, fetch credentials.
    Enroll(enroll::EnrollArgs),
    /// Reference device client: renew the certificate in DIR (signed-nonce proof).
    Renew(renew::RenewArgs),
    /// Move a stopped deployment's store from SQLite to PostgreSQL (an empty
    /// database), audit chain included. Exit status: 0 migrated, 1 failed
    /// (nothing written), 2 bad arguments, 3 refused (target not empty,
    /// schema version mismatch, a daemon on the source).
    Migrate(migrate::MigrateArgs),
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// List devices, newest first, one page at a time.
    List {
        /// active, suspended or revoked.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show a device and its certificates.
    Show { id: String },
    /// Revoke a device and its unexpired certificates (final).
    Revoke {
        id: String,
        /// RFC 5280 reason: key-compromise (or keyCompromise), affiliation-changed,
        /// superseded, cessation-of-operation, privilege-withdrawn, ...
        #[arg(long, default_value = "unspecified")]
        reason: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Suspend a device: its certificates go on hold (certificateHold).
    Suspend {
        id: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Lift a suspension: the held certificates are valid again.
    Resume {
        id: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Let the device renew once before its renewal window opens.
    AllowRenewal {
        id: String,
        /// How long the allowance may be used (1-720 hours).
        #[arg(long, default_value_t = 24)]
        hours: u32,
        #[arg(long)]
        comment: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// List certificates, newest first, one page at a time.
    List {
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
        /// valid, revoked or superseded.
        #[arg(long)]
        status: Option<String>,
        /// Only this issuing CA's.
        #[arg(long)]
        issuer: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Valid device certificates that expire within a time, soonest first,
    /// with whether their renewal window is open (what is due).
    Expiring {
        /// 30d, 12h or 90m (at most 3650d).
        #[arg(long, default_value = "30d")]
        within: String,
        /// Page size (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after a previous page (the `next_cursor` it printed).
        #[arg(long)]
        cursor: Option<String>,
        /// Print the JSON answer (like `--output json`).
        #[arg(long)]
        json: bool,
    },
    /// Show one certificate.
    Show { serial: String },
    /// Revoke one certificate; certificate-hold puts it on hold.
    Revoke {
        serial: String,
        /// RFC 5280 reason (key-compromise or keyCompromise, certificate-hold, ...).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Release a hold on one certificate.
    ReleaseHold {
        serial: String,
        #[arg(long)]
        comment: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Mint a bootstrap token for a group (or, with --reclaim DEVICE, a
    /// one-time reclaim code); the secret is printed once.
    Create {
        /// The enrollment group (attestation `bootstrap-token`).
        #[arg(long)]
        group: Option<String>,
        /// Registrations the token may attest (default 1).
        #[arg(long)]
        uses: Option<u32>,
        /// Lifetime: 90s, 30m, 24h, 7d (at most 7 days).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// The only device name the token may register (implies one use).
        #[arg(long)]
        device_name: Option<String>,
        /// Mint a reclaim code for this existing device id instead.
        #[arg(long, value_name = "DEVICE")]
        reclaim: Option<String>,
    },
    /// List tokens and codes, newest first.
    List {
        /// bootstrap or reclaim.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// Reclaim codes of this device.
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Revoke a token or code (its earlier uses stand).
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum PoliciesCommand {
    /// Validate and reload policies/*.toml in the running daemon (same as SIGHUP).
    Reload,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config and the policies without starting.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Keyset pagination of list commands.
#[derive(Debug, Clone, clap::Args)]
pub struct PageArgs {
    /// Page size (1-1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Continue after a previous page (the `next_cursor` it printed).
    #[arg(long)]
    pub cursor: Option<String>,
    /// newest (default) or oldest first.
    #[arg(long)]
    pub order: Option<String>,
}

#[derive(Debug, Subcommand)]
enum RegistrationsCommand {
    /// List registrations, newest first, one page at a time.
    List {
        /// pending, approved, issued, denied or expired.
        #[arg(long)]
        status: Option<String>,
        /// Only this enrollment group.
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one registration with its approvals.
    Show { id: String },
    /// Approve a registration.
    Approve {
        id: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Deny a registration.
    Deny {
        id: String,
        #[arg(long)]
        comment: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AdminsCommand {
    /// Invite an admin: prints an invitation code to give to the invitee.
    /// With two or more active admins, another admin must approve
    /// (`admins approve`) and gives the invitee an approval code too.
    Add {
        #[arg(long)]
        name: String,
        /// admin, approver or auditor.
        #[arg(long)]
        role: String,
    },
    /// Redeem an invitation (run by the invitee; needs no admin token).
    /// Codes come from KEYWARD_INVITATION_CODE / KEYWARD_APPROVAL_CODE or
    /// from files, never from the command line.
    Redeem {
        /// File holding the invitation code (else KEYWARD_INVITATION_CODE).
        #[arg(long)]
        invitation_file: Option<PathBuf>,
        /// File holding the approval code (else KEYWARD_APPROVAL_CODE), when
        /// a second admin approved the invitation.
        #[arg(long)]
        approval_file: Option<PathBuf>,
        /// Write the new token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_out: Option<PathBuf>,
    },
    /// Change an admin's role (raising one needs a second admin's approval).
    SetRole {
        /// Admin id or name.
        admin: String,
        /// admin, approver or auditor.
        role: String,
    },
    /// List invitations and role changes (pending ones wait for a second admin).
    Requests {
        /// pending, approved, redeemed, denied or expired.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Approve another admin's invitation or role change.
    Approve { request: String },
    /// Local, audited emergency path: when fewer than two admins of role
    /// admin are active (one was disabled, so nobody can approve roster
    /// changes), create an admin directly from the config's database and
    /// pepper. Needs no daemon and no token; refused otherwise.
    BreakGlass {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        name: String,
        /// admin (default), approver or auditor.
        #[arg(long, default_value = "admin")]
        role: String,
        /// Write the new admin's token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_out: Option<PathBuf>,
    },
    /// Deny another admin's invitation or role change.
    Deny { request: String },
    /// List admins, newest first, one page at a time.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Disable an admin (by id or name); its token stops working at once.
    Disable { admin: String },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Make a backup now (role admin) and wait for it and its replicas;
    /// exit status 1 if a replica failed (the daemon retries it).
    Create {
        /// Return once the daemon has started it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List backups, newest first, with where each is stored (role auditor).
    List {
        /// Also those retention removed.
        #[arg(long)]
        all: bool,
    },
    /// One backup with its manifest summary and replicas (role auditor).
    Show { id: String },
    /// Download a backup (default: the newest) from every location and
    /// check it; exit status 1 if any location fails (role admin).
    Verify { id: Option<String> },
    /// Restore an archive into an empty store and token (daemon stopped).
    /// Checks every hash before writing anything.
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// age identity file (X25519 `AGE-SECRET-KEY-1…`, or an unencrypted
        /// OpenSSH private key) that decrypts the archive; repeatable.
        #[arg(long = "identity-file", required = true)]
        identity_files: Vec<PathBuf>,
        /// Restore over a non-empty store (moved aside, never deleted) or token.
        #[arg(long)]
        force: bool,
        /// Check the archive and say what a restore would do; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse unless the archive's SHA-256 is this (from the
        /// `backup.create` audit event, the backup list or a notification):
        /// anyone who can write to a location can plant an archive.
        #[arg(long)]
        expect_sha256: Option<String>,
        /// Refuse unless the restored hierarchy chains to the root CA
        /// certificate with this SHA-256 (hex, colons allowed).
        #[arg(long)]
        expect_root_sha256: Option<String>,
        /// The archive (`keyward-….age`).
        archive: PathBuf,
    },
    /// Download a backup from a configured location (no daemon needed).
    Fetch {
        #[command(flatten)]
        config: ConfigArg,
        /// Location name (`[[backup.locations]]`).
        #[arg(long)]
        location: String,
        /// Archive file name; the newest when absent.
        name: Option<String>,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Fetch a CA's current CRL (public; `--publish` needs an admin token).
    Crl {
        /// CA name (as in policies/ca.toml).
        name: String,
        /// Write the CRL to this file (replaced atomically, so a relying
        /// party reading it never sees half a file) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// PEM (`-----BEGIN X509 CRL-----`) instead of DER.
        #[arg(long)]
        pem: bool,
        /// Publish a new CRL first (role admin).
        #[arg(long)]
        publish: bool,
    },
    /// Rotate an issuing CA's key (role admin): a new key, certified by the
    /// parent, published, activated; the old key keeps signing CRLs and OCSP
    /// answers for its certificates until they expire.
    Rotate {
        /// CA name (an issuing CA; roots are not rotated by keyward).
        name: String,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Wait until the new key is active (or a step fails).
        #[arg(long)]
        wait: bool,
        /// Why (audited).
        #[arg(long)]
        reason: Option<String>,
        /// The parent's key is on a YubiKey that the daemon reaches now:
        /// certify the new key with it (the scheduler never does; the
        /// rotation waits at `key-generated` for this command).
        #[arg(long)]
        with_root_card: bool,
    },
    /// List rotations, newest first (role auditor).
    Rotations {
        /// Only those not finished.
        #[arg(long)]
        open: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List every key the store knows with its state, age and next
    /// scheduled rotation (reads the database; needs no daemon).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Rotate a key of keyward's own on demand (role admin).
    Rotate {
        /// `ocsp-signing` (the TLS server key is replaced with every
        /// renewal of its certificate; CA keys: `keyward ca rotate`).
        purpose: String,
        /// The CA whose key of that purpose rotates.
        #[arg(long)]
        ca: String,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Wait until the new key is active (or a step fails).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain, check every HSM-signed checkpoint, and name
    /// the first broken sequence number and what broke (edited, deleted,
    /// inserted, reordered, relinked, rechained, truncated, forged-checkpoint).
    /// Exit 0 intact, 1 broken, 2 could not verify.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Verify only the tail after this checkpoint (its signature must
        /// verify): the events before it are trusted.
        #[arg(long, value_name = "SEQ")]
        from_checkpoint: Option<i64>,
        /// More checkpoints, one JSON object per line (e.g. a copy of
        /// `audit.checkpoint_file` kept elsewhere); added to the store's.
        #[arg(long, value_name = "FILE")]
        checkpoints: Vec<std::path::PathBuf>,
        /// Check checkpoint signatures with this public key (PEM SPKI, from
        /// `keyward audit public-key`) instead of reading it from the token.
        #[arg(long, value_name = "PEM")]
        public_key: Option<std::path::PathBuf>,
        /// Print the result as JSON.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the audit key's public key (PEM), read from the token, for
    /// auditors who verify checkpoints and exports on their own.
    PublicKey {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Audit events from the daemon, newest first, filtered (role auditor;
    /// auditors see sealed details decrypted, other roles redacted).
    /// Follows pages up to --limit events.
    Report {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        filter: audit::ReportArgs,
    },
    /// Write the events (oldest first) as JSON lines to a file for a SIEM,
    /// closed by a line the daemon signs with the HSM audit key; see
    /// docs/audit.md, "Exporting to a SIEM" (role auditor).
    Export {
        #[command(flatten)]
        client: ClientArgs,
        /// From this time (RFC 3339 or Unix seconds).
        #[arg(long)]
        since: Option<String>,
        /// Before this time (RFC 3339 or Unix seconds).
        #[arg(long)]
        until: Option<String>,
        /// The file to write (replaced if it exists).
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
}

/// Runs the CLI and returns the process exit code.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // TLS for the HTTP client; ring is already linked for signature checks.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init {
            config,
            admin_name,
            token_out,
        } => local::init(&config.config, &admin_name, token_out.as_deref()).await,
        Command::Serve { config } => local::serve(&config.config).await,
        Command::Dev { dir, listen } => dev::run(&dir, listen).await,
        Command::Config {
            command: ConfigCommand::Check { config },
        } => local::config_check(&config.config),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    config,
                    from_checkpoint,
                    checkpoints,
                    public_key,
                    output,
                },
        } => {
            local::audit_verify(
                &config.config,
                local::VerifyArgs {
                    from_checkpoint,
                    checkpoints,
                    public_key,
                },
                output,
            )
            .await
        }
        Command::Audit {
            command: AuditCommand::PublicKey { config },
        } => local::audit_public_key(&config.config).await,
        Command::Audit {
            command: AuditCommand::Report { client, filter },
        } => audit::report(&client, filter).await,
        Command::Audit {
            command:
                AuditCommand::Export {
                    client,
                    since,
                    until,
                    out,
                },
        } => audit::export(&client, since, until, &out).await,
        Command::Registrations { client, command } => client::registrations(&client, command).await,
        Command::Admins {
            command:
                AdminsCommand::BreakGlass {
                    config,
                    name,
                    role,
                    token_out,
                },
            ..
        } => local::break_glass(&config.config, &name, &role, token_out.as_deref()).await,
        Command::Admins { client, command } => client::admins(&client, command).await,
        Command::Tokens { client, command } => tokens::tokens(&client, command).await,
        Command::Policies { client, command } => tokens::policies(&client, command).await,
        Command::Backup { client, command } => match command {
            BackupCommand::Create { no_wait } => backup::create(&client, !no_wait).await,
            BackupCommand::List { all } => backup::list(&client, all).await,
            BackupCommand::Show { id } => backup::show(&client, &id).await,
            BackupCommand::Verify { id } => backup::verify(&client, id.as_deref()).await,
            BackupCommand::Restore {
                config,
                identity_files,
                force,
                dry_run,
                expect_sha256,
                expect_root_sha256,
                archive,
            } => {
                backup::restore(
                    &config.config,
                    client.output,
                    archive,
                    identity_files,
                    force,
                    dry_run,
                    (expect_sha256, expect_root_sha256),
                )
                .await
            }
            BackupCommand::Fetch {
                config,
                location,
                name,
                out,
            } => backup::fetch(&config.config, &location, name.as_deref(), &out).await,
        },
        Command::Ca { client, command } => match command {
            CaCommand::Rotate {
                name,
                dry_run,
                wait,
                reason,
                with_root_card,
            } if with_root_card && !dry_run => {
                rotation::rotate_with_root_card(&client, &name, wait, reason).await
            }
            CaCommand::Rotate {
                name,
                dry_run,
                wait,
                reason,
                ..
            } => rotation::rotate(&client, "issuing-ca", &name, dry_run, wait, reason).await,
            CaCommand::Rotations { open } => rotation::list(&client, open).await,
            crl => client::ca(&client, crl).await,
        },
        Command::Keys {
            client,
            command: KeysCommand::List { config },
        } => local::keys_list(&config.config, client.output).await,
        Command::Keys {
            client,
            command:
                KeysCommand::Rotate {
                    purpose,
                    ca,
                    dry_run,
                    wait,
                },
        } => rotation::rotate(&client, &purpose, &ca, dry_run, wait, None).await,
        Command::Enroll(args) => enroll::run(args).await,
        Command::Renew(args) => renew::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Devices { client, command } => lifecycle::devices(&client, command).await,
        Command::Certs { client, command } => lifecycle::certs(&client, command).await,
    }
}
