//! A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` in a temporary folder, serving
//! on a free port of 127.0.0.1 with trust authentication, stopped and removed when dropped.
//!
//! The server programs are found in `ABLATE_PG_BIN`, else in the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package), else in a folder of the `PATH`. PostgreSQL refuses to
//! run as root; as root the cluster runs as the `postgres` user that package creates.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A running throwaway cluster (see the module's documentation).
#[derive(Debug)]
pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The user the server runs as, when this process is root.
    run_as: Option<String>,
    databases: AtomicUsize,
}

/// The cluster's superuser, in every URL.
const USER: &str = "ablate";

impl TempPostgres {
    /// Initialises and starts a cluster; the error says what is missing or what failed.
    pub fn start() -> Result<TempPostgres, String> {
        let bin = server_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("ablate-pg-")
            .tempdir()
            .map_err(|e| format!("creating a folder for the cluster: {e}"))?;
        let run_as = if is_root() {
            let (uid, gid) = user_ids("postgres")?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| {
                format!("giving {} to the postgres user: {e}", dir.path().display())
            })?;
            Some("postgres".to_owned())
        } else {
            None
        };
        let port = free_port()?;
        let cluster = TempPostgres {
            dir,
            bin,
            port,
            run_as,
            databases: AtomicUsize::new(0),
        };
        let data = cluster.dir.path().join("data");
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                USER.as_ref(),
                "--auth=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--no-locale".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        // fsync off: a test cluster need not survive a power cut
        let options = format!(
            "-p {port} -h 127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            cluster.dir.path().display()
        );
        let log = cluster.dir.path().join("server.log");
        cluster
            .run(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-o".as_ref(),
                    options.as_ref(),
                    "-w".as_ref(),
                    "start".as_ref(),
                ],
            )
            .map_err(|e| {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                format!("{e}\nserver log:\n{log}")
            })?;
        Ok(cluster)
    }

    /// A new, empty database on the cluster; its URL.
    pub fn create_database(&self) -> Result<String, String> {
        let name = format!("t{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let port = self.port.to_string();
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", USER, &name])
            .output()
            .map_err(|e| format!("running createdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "createdb {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(self.url(&name))
    }

    /// The URL of database `name` on the cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// The server's version line (`postgres (PostgreSQL) 15.18 …`).
    pub fn version(&self) -> String {
        Command::new(self.bin.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }

    /// Runs the server program `program` (as the server's user when this process is root).
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let path = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        // the server's user may not read the caller's working directory
        let out = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| format!("running {}: {e}", path.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
    }
}

/// The folder of PostgreSQL's server programs (see the module's documentation).
fn server_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("ABLATE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let programs = ["initdb", "pg_ctl", "postgres", "createdb"];
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).find(|d| programs.iter().all(|p| d.join(p).is_file()))
    });
    on_path.ok_or_else(|| {
        "PostgreSQL's server programs (initdb, pg_ctl) were not found: install the \
         'postgresql' package (apt-get install postgresql), or set ABLATE_PG_BIN to their folder \
         (with createdb and postgres)"
            .to_owned()
    })
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The user id and group id of `user`, from /etc/passwd.
fn user_ids(user: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd"))
        .map_err(|e| format!("reading /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == user)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| {
            format!(
                "PostgreSQL does not run as root, and there is no '{user}' user to run it as \
                 (the 'postgresql' package creates one)"
            )
        })
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}
