fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/pgherd/v1/agent.proto"], &["proto"])?;
    Ok(())
}
