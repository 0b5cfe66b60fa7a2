//! Atomic file output: write under a temporary name in the same directory, fsync, then rename.
//! A job killed at any moment leaves either the old file, the complete new one, or a `*.tmp-*`
//! leftover that no reader mistakes for a finished file.

use crate::error::{DataError, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written atomically. Nothing appears at `path` until [`AtomicFile::commit`];
/// dropping it uncommitted removes the temporary file.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| DataError::Invalid(format!("{} has no file name", path.display())))?;
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        Ok(AtomicFile {
            path,
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flush, fsync and rename into place.
    pub fn commit(mut self) -> Result<()> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| DataError::Invalid("atomic file committed twice".into()))?;
        let file = writer
            .into_inner()
            .map_err(|e| DataError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(&self.tmp, e))?;
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; failure here is not worth failing the write for.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.writer.as_mut() {
            Some(w) => w.write(buf),
            None => Err(std::io::Error::other("atomic file already committed")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Write a whole file atomically.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)
        .map_err(|e| DataError::io(f.path().to_path_buf(), e))?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("out.bin");
        {
            let mut f = AtomicFile::create(&target).expect("create");
            f.write_all(b"partial").expect("write");
        }
        assert!(!target.exists());
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn committed_file_replaces_old_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("sub/out.txt");
        write_atomic(&target, b"one").expect("first");
        write_atomic(&target, b"two").expect("second");
        assert_eq!(fs::read(&target).expect("read"), b"two");
        assert_eq!(
            fs::read_dir(target.parent().expect("dir"))
                .expect("ls")
                .count(),
            1
        );
    }
}
