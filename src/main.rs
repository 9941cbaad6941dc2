fn main() -> std::process::ExitCode {
    walden::cli::main()
}
