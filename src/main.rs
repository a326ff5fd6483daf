use clap::Parser;

fn main() {
    // Like other Unix tools, stop quietly when the reader of our output goes
    // away (`ferry devices | head`) instead of panicking on a broken pipe.
    // SAFETY: called first thing, before any other thread exists; restoring a
    // signal's default disposition has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = ferry::cli::Cli::parse();
    std::process::exit(ferry::cli::run(args));
}
