//! Content-addressed storage for the file contents that undo entries restore: one file per
//! SHA-256 under `<data dir>/blobs`, written atomically, verified when read back.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The blob directory.
#[derive(Clone, Debug)]
pub(crate) struct BlobStore {
    dir: PathBuf,
    /// Taken by `put` and by the collector's look-and-remove, so a blob being reused is
    /// never removed between the two.
    gc: std::sync::Arc<std::sync::Mutex<()>>,
}

impl BlobStore {
    pub(crate) fn open(dir: PathBuf) -> io::Result<Self> {
        crate::fsops::create_private_dir(&dir)?;
        Ok(Self {
            dir,
            gc: Default::default(),
        })
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(&hash[..2]).join(hash)
    }

    /// Stores bytes (durably) and returns their hash. An existing blob is only touched, so the
    /// collector does not take it while a new undo entry is about to reference it.
    pub(crate) fn put(&self, bytes: &[u8]) -> io::Result<String> {
        let hash = crate::fsops::sha256_hex(bytes);
        let path = self.path(&hash);
        let _gc = self.gc.lock().expect("blob lock");
        if path.exists() {
            let f = std::fs::File::options().append(true).open(&path)?;
            f.set_modified(SystemTime::now())?;
            return Ok(hash);
        }
        crate::fsops::write_atomic(&path, bytes, 0o600, None)?;
        Ok(hash)
    }

    /// Reads a blob back, checking it is what its name says.
    pub(crate) fn get(&self, hash: &str) -> io::Result<Vec<u8>> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad blob name {hash}"),
            ));
        }
        let bytes = std::fs::read(self.path(hash))?;
        if crate::fsops::sha256_hex(&bytes) != hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("blob {hash} is corrupt"),
            ));
        }
        Ok(bytes)
    }

    /// Deletes blobs no undo entry references, sparing those touched in the last `grace`.
    pub(crate) fn collect(
        &self,
        referenced: &std::collections::HashSet<String>,
        grace: Duration,
    ) -> io::Result<usize> {
        let mut removed = 0;
        let cutoff = SystemTime::now() - grace;
        for shard in std::fs::read_dir(&self.dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for blob in std::fs::read_dir(shard.path())? {
                let blob = blob?;
                let name = blob.file_name().to_string_lossy().into_owned();
                if referenced.contains(&name) {
                    continue;
                }
                let young = blob
                    .metadata()?
                    .modified()
                    .map(|m| m > cutoff)
                    .unwrap_or(true);
                if !young && remove(&blob.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

fn remove(path: &Path) -> io::Result<()> {
    std::fs::remove_file(path)
}
