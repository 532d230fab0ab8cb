//! Compression of archived WAL and base backups, and the SHA-256 taps that checksum a
//! stream while it passes.

use std::io::{Read, Write};

use pgherd_config::Compression;
use sha2::{Digest, Sha256};

/// The compression a stored file's name says it has.
pub fn from_name(name: &str) -> Compression {
    if name.ends_with(".zst") {
        Compression::Zstd
    } else if name.ends_with(".gz") {
        Compression::Gzip
    } else {
        Compression::None
    }
}

/// Compresses everything `fill` writes into `out`. `workers > 1` lets zstd compress on
/// several threads (base backups).
pub fn compress_into(
    out: &mut dyn Write,
    compression: Compression,
    level: i32,
    workers: u32,
    fill: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    match compression {
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(out, level)?;
            if workers > 1 {
                enc.multithread(workers)?;
            }
            fill(&mut enc)?;
            enc.finish()?;
        }
        Compression::Gzip => {
            let mut enc =
                flate2::write::GzEncoder::new(out, flate2::Compression::new(level as u32));
            fill(&mut enc)?;
            enc.finish()?;
        }
        Compression::None => fill(out)?,
    }
    Ok(())
}

/// A reader that decompresses `input`.
pub fn decompressor<'a>(
    input: Box<dyn Read + Send + 'a>,
    compression: Compression,
) -> std::io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match compression {
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(input)),
        Compression::None => input,
    })
}

/// Hashes what is read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The hex SHA-256 of everything read so far.
    pub fn hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Hashes what is written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    pub bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    pub fn hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compression_round_trips() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let mut stored = Vec::new();
            compress_into(&mut stored, c, c.default_level(), 1, &mut |w| {
                w.write_all(&data)
            })
            .unwrap();
            let mut back = Vec::new();
            decompressor(Box::new(&stored[..]), c)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{c:?}");
        }
    }
}
