//! `keyward migrate`: moves a stopped deployment's store from SQLite to
//! PostgreSQL through a snapshot (one SQLite read transaction streamed into
//! one PostgreSQL transaction), so the target holds exactly what the source
//! held, its audit chain continued by a `store.migrated` event.
//!
//! Exit codes (docs/operations.md): 0 migrated (or `--dry-run` passed);
//! 1 the migration failed on the way (nothing committed on the target);
//! 2 bad arguments (an unknown backend, a password in the URL, a missing
//! source or password file); 3 refused by a check (the target is not empty
//! or at another schema version, a daemon holds the source).

use crate::store::Store as _;
use crate::store::postgres::snapshot::{ImportError, PgImporter};
use crate::store::snapshot::{SnapshotInfo, SnapshotSink};
use crate::store::sqlite::SqliteStore;
use secrecy::{ExposeSecret as _, SecretString};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The command's arguments.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The source store: `sqlite:PATH` (the daemons on it stopped).
    #[arg(long, value_name = "sqlite:PATH")]
    from: String,
    /// The target: `postgres:URL` (or the URL alone, `postgres://user@host:port/db`),
    /// an empty database. A password in the URL is refused.
    #[arg(long, value_name = "postgres:URL")]
    to: String,
    /// File holding the PostgreSQL password (otherwise the KEYWARD_PG_PASSWORD
    /// environment variable, or none). Never a command-line value: argv shows in `ps`.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Read the source and load it into the target inside a transaction
    /// that is then rolled back: every check, nothing written.
    #[arg(long)]
    dry_run: bool,
}

/// Exit statuses, as documented.
const FAILED: u8 = 1;
const BAD_ARGUMENTS: u8 = 2;
const REFUSED: u8 = 3;

/// The password environment variable (as `[store] password_env` names it
/// in the agreed config).
const PASSWORD_ENV: &str = "KEYWARD_PG_PASSWORD";

/// How the command ended when it did not migrate.
struct Stop(u8, String);

fn bad(msg: impl Into<String>) -> Stop {
    Stop(BAD_ARGUMENTS, msg.into())
}

fn failed(msg: impl Into<String>) -> Stop {
    Stop(FAILED, msg.into())
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    match migrate(args).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(Stop(code, msg)) => {
            eprintln!("error: {msg}");
            Ok(ExitCode::from(code))
        }
    }
}

/// The target, with what may be printed of it (the URL holds no password).
struct Target {
    config: tokio_postgres::Config,
    shown: String,
}

fn parse_target(to: &str, password: Option<SecretString>) -> Result<Target, Stop> {
    let url = match to.strip_prefix("postgres:") {
        Some(rest) if rest.starts_with("//") => to,
        Some(rest) => rest,
        None if to.starts_with("postgresql://") => to,
        None => {
            return Err(bad(format!(
                "--to must be postgres:URL (e.g. postgres:postgres://keyward@127.0.0.1:5432/keyward); \
                 migrating to `{}` is not supported",
                to.split(':').next().unwrap_or(to)
            )));
        }
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(bad("--to must hold a postgres:// URL"));
    }
    // Parse errors are not echoed: they could quote a password.
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| bad("--to is not a valid PostgreSQL URL"))?;
    if config.get_password().is_some() {
        return Err(bad(format!(
            "a password in the URL is refused (it would show in `ps` and shell history): \
             use --password-file or {PASSWORD_ENV}"
        )));
    }
    if let Some(p) = password {
        config.password(p.expose_secret());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("keyward migrate");
    Ok(Target {
        config,
        shown: url.to_string(),
    })
}

fn read_password(file: Option<&Path>) -> Result<Option<SecretString>, Stop> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| bad(format!("cannot read password file {}: {e}", f.display())))?;
        let text = zeroize::Zeroizing::new(text);
        let p = text.trim_end_matches(['\n', '\r']);
        if p.is_empty() {
            return Err(bad(format!("password file {} is empty", f.display())));
        }
        return Ok(Some(SecretString::from(p.to_string())));
    }
    Ok(std::env::var(PASSWORD_ENV)
        .ok()
        .filter(|p| !p.is_empty())
        .map(SecretString::from))
}

/// The schema version of the SQLite file (`PRAGMA user_version`), read
/// without the store (which only says whether it is too new).
fn sqlite_version(path: &Path) -> Result<i64, Stop> {
    let c = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| failed(format!("cannot open {}: {e}", path.display())))?;
    c.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| failed(format!("{} is not a keyward store: {e}", path.display())))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the export hands the import: the sink runs on the store's blocking
/// reader thread and waits for the import to take each chunk.
enum Chunk {
    Table(String, Vec<String>),
    Rows(Vec<u8>),
}

struct ChannelSink(tokio::sync::mpsc::Sender<Chunk>);

impl SnapshotSink for ChannelSink {
    fn table(&mut self, table: &str, columns: &[String]) -> std::io::Result<()> {
        self.0
            .blocking_send(Chunk::Table(table.to_string(), columns.to_vec()))
            .map_err(|_| std::io::Error::other("the import stopped"))
    }

    fn rows(&mut self, _table: &str, jsonl: Vec<u8>, _rows: u64) -> std::io::Result<()> {
        self.0
            .blocking_send(Chunk::Rows(jsonl))
            .map_err(|_| std::io::Error::other("the import stopped"))
    }
}

fn import_error(e: ImportError) -> Stop {
    match e {
        ImportError::Store(e) => failed(format!("the import failed, nothing was written: {e}")),
        refused => Stop(REFUSED, format!("{refused}; nothing was written")),
    }
}

async fn migrate(args: MigrateArgs) -> Result<(), Stop> {
    let Some(source) = args.from.strip_prefix("sqlite:") else {
        return Err(bad(format!(
            "--from must be sqlite:PATH; migrating from `{}` is not supported",
            args.from.split(':').next().unwrap_or(&args.from)
        )));
    };
    let source = PathBuf::from(source);
    if !source.is_file() {
        return Err(bad(format!(
            "the source store {} does not exist",
            source.display()
        )));
    }
    let password = read_password(args.password_file.as_deref())?;
    let target = parse_target(&args.to, password)?;

    let version = sqlite_version(&source)?;
    // Checked before anything opens the source or the target: an older
    // file is brought up to date by this build's `serve`, a newer one by
    // a newer `keyward migrate`.
    let supported = crate::store::postgres::SCHEMA_VERSION;
    if version != supported {
        return Err(import_error(ImportError::SchemaUnsupported {
            found: version,
            supported,
        }));
    }
    let store = SqliteStore::open_read_only(&source)
        .map_err(|e| failed(format!("cannot open {}: {e}", source.display())))?;
    // A daemon still serving the source would go on writing into a store
    // the deployment is leaving: those changes would be lost.
    match store
        .lease_holder(crate::jobs::leader::SCHEDULER_LEASE, now_ms())
        .await
    {
        Ok(None) => {}
        Ok(Some(holder)) => {
            return Err(Stop(
                REFUSED,
                format!(
                    "a daemon holds the scheduler lease of {} ({holder}): stop every `keyward serve` on it first",
                    source.display()
                ),
            ));
        }
        Err(e) => return Err(failed(format!("cannot read {}: {e}", source.display()))),
    }

    let (mut client, connection) = target
        .config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| failed(format!("cannot connect to {}: {e}", target.shown)))?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the PostgreSQL connection ended");
        }
    });
    let started = Instant::now();
    let out = load(
        &store,
        &mut client,
        version,
        &source,
        &target,
        args.dry_run,
        started,
    )
    .await;
    drop(client);
    let _ = conn_task.await;
    let summary = out?;
    print!("{summary}");
    Ok(())
}

/// Streams the snapshot into the target and commits (or, dry, rolls back).
/// Returns the summary to print.
async fn load(
    store: &SqliteStore,
    client: &mut tokio_postgres::Client,
    version: i64,
    source: &Path,
    target: &Target,
    dry_run: bool,
    started: Instant,
) -> Result<String, Stop> {
    let mut importer = PgImporter::create(client, version)
        .await
        .map_err(import_error)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let export = store.export_snapshot(Box::new(ChannelSink(tx)));
    let import = async {
        let mut result: Result<(), crate::store::StoreError> = Ok(());
        while let Some(c) = rx.recv().await {
            let step = match c {
                Chunk::Table(t, cols) => importer.table(&t, &cols).await,
                Chunk::Rows(jsonl) => importer.rows(&jsonl).await.map(|_| ()),
            };
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        // On an import error, closing the channel stops the export.
        rx.close();
        result
    };
    // The import's error explains an export stopped by a closed channel.
    let (exported, imported) = tokio::join!(export, import);
    imported.map_err(|e| failed(format!("the import failed, nothing was written: {e}")))?;
    let info: SnapshotInfo = exported.map_err(|e| {
        failed(format!(
            "reading {} failed, nothing was written: {e}",
            source.display()
        ))
    })?;
    if info.schema_version != version {
        return Err(failed(format!(
            "the source changed schema version during the export ({version} → {}): nothing was written",
            info.schema_version
        )));
    }
    // What arrived is what was sent.
    for t in &info.tables {
        let got = importer.counts().get(&t.name).copied().unwrap_or(0);
        if got != t.rows {
            return Err(failed(format!(
                "table {}: {} rows exported, {got} imported: nothing was written",
                t.name, t.rows
            )));
        }
    }
    let head = importer
        .audit_head()
        .await
        .map_err(|e| failed(format!("the import failed, nothing was written: {e}")))?;
    let head_hex = head
        .as_ref()
        .map(|(_, h)| hex::encode(h))
        .unwrap_or_default();
    let head_seq = head.as_ref().map(|(s, _)| *s).unwrap_or(0);
    if head_seq != info.audit_head_seq || head_hex != info.audit_head_hash {
        return Err(failed(
            "the imported audit chain does not end where the source's does: nothing was written",
        ));
    }
    let rows_total: u64 = info.tables.iter().map(|t| t.rows).sum();
    let mut summary = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        summary,
        "{} sqlite:{} → {} (schema version {version})",
        if dry_run { "dry run:" } else { "migrated" },
        source.display(),
        target.shown
    );
    for t in &info.tables {
        let _ = writeln!(summary, "  {:<22} {:>10}", t.name, t.rows);
    }
    if dry_run {
        // Dropping the importer rolls its transaction back.
        drop(importer);
        let secs = started.elapsed().as_secs_f64();
        let _ = writeln!(
            summary,
            "{rows_total} rows checked in {secs:.2} s; audit head seq {head_seq}; nothing was written"
        );
        return Ok(summary);
    }
    let hosts: Vec<String> = target
        .config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let rows: serde_json::Map<String, serde_json::Value> = info
        .tables
        .iter()
        .map(|t| (t.name.clone(), serde_json::json!(t.rows)))
        .collect();
    let details = serde_json::json!({
        "from": { "backend": "sqlite", "path": source.display().to_string() },
        "to": {
            "backend": "postgres",
            "hosts": hosts,
            "ports": target.config.get_ports(),
            "dbname": target.config.get_dbname(),
            "user": target.config.get_user(),
        },
        "schema_version": version,
        "rows": rows,
        "source_head_seq": info.audit_head_seq,
        "source_head_hash": info.audit_head_hash,
    });
    let change = crate::store::Change::new().audit(
        crate::audit::AuditDraft::new("cli:migrate", "store.migrated", "store:postgres")
            .details(details),
    );
    let seqs = importer
        .finish(change, now_ms())
        .await
        .map_err(|e| failed(format!("the import failed, nothing was written: {e}")))?;
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(
        summary,
        "{rows_total} rows in {secs:.2} s ({:.0} rows/s); audit chain carried over up to seq {head_seq}, store.migrated recorded as seq {}",
        rows_total as f64 / secs.max(1e-9),
        seqs.first().copied().unwrap_or(0)
    );
    let _ = writeln!(
        summary,
        "next: point [store] at this database (type = \"postgres\"), run `keyward audit verify`, then start the daemons"
    );
    // Fresh planner statistics for the loaded tables (best effort: the
    // migration is committed either way).
    if let Err(e) = client.batch_execute("ANALYZE").await {
        let _ = writeln!(
            summary,
            "warning: ANALYZE failed ({e}); autovacuum will catch up"
        );
    }
    Ok(summary)
}
