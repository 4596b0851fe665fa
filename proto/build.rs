//! Generates the protocol code into OUT_DIR with the vendored protoc, so a
//! fresh clone builds without a system protoc.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let include = protoc_bin_vendored::include_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // `HostService.Connect` would clash with the generated `connect` constructor;
        // clients build a Channel and call `::new(channel)` instead.
        .build_transport(false)
        // Small per-stream buffers: host streams are long-lived and carry tiny messages.
        .codec_path("crate::codec::CompactCodec")
        .file_descriptor_set_path(out_dir.join("switchboard_descriptor.bin"))
        .compile_with_config(
            config,
            &[PathBuf::from("proto/switchboard/v1/switchboard.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
