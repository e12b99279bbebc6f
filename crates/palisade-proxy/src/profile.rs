//! CPU profiles on demand (`GET /debug/pprof/profile?seconds=N`, token
//! required): pprof protobuf (open with `go tool pprof -http=: profile.pb`
//! or `pprof`), or a flamegraph SVG with `format=svg`. One at a time,
//! at most 60 s, sampling at 99 Hz.

use std::time::Duration;

use pprof::protos::Message;

/// What to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// pprof protobuf (uncompressed).
    Pprof,
    /// Flamegraph SVG.
    Svg,
}

const NO_SAMPLES_SVG: &str = "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"25\">no CPU samples: the process was idle</text></svg>\n";

/// Longest profile.
pub const MAX_SECONDS: u64 = 60;

/// Profiles the whole process for `seconds` on a blocking thread (the
/// profiler guard cannot cross await points) and returns the encoded
/// profile.
pub async fn collect(seconds: u64, format: Format) -> Result<Vec<u8>, String> {
    let seconds = seconds.clamp(1, MAX_SECONDS);
    tokio::task::spawn_blocking(move || {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(99)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| format!("cannot start the profiler: {e}"))?;
        std::thread::sleep(Duration::from_secs(seconds));
        let report = guard
            .report()
            .build()
            .map_err(|e| format!("cannot build the report: {e}"))?;
        let mut out = Vec::new();
        match format {
            Format::Svg => {
                report
                    .flamegraph(&mut out)
                    .map_err(|e| format!("cannot draw the flamegraph: {e}"))?;
                // An idle process yields no stacks, and inferno draws nothing.
                if out.is_empty() {
                    out = NO_SAMPLES_SVG.as_bytes().to_vec();
                }
            }
            Format::Pprof => {
                let profile = report
                    .pprof()
                    .map_err(|e| format!("cannot encode the profile: {e}"))?;
                profile
                    .write_to_vec(&mut out)
                    .map_err(|e| format!("cannot encode the profile: {e}"))?;
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| format!("profiler thread failed: {e}"))?
}
