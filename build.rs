//! Compiles the proto with protox (pure Rust), so no system `protoc` is needed,
//! and writes the descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/riskgate/v1/riskgate.proto",
        "proto/riskgate/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("riskgate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
