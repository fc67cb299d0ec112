//! SSH signal names as the frames carry them, and russh's signals.

use russh::Sig;

/// A signal's SSH name (without `SIG`).
pub fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(c) => c.as_str(),
    }
    .to_string()
}

/// The signal an SSH name (without `SIG`) stands for.
pub fn sig_from(s: &str) -> Sig {
    match s {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_string()),
    }
}

/// The frame channel of the connection's global requests and replies.
pub const GLOBAL_CHANNEL: u32 = u32::MAX;
/// The high bit marks the channels the target opens (numbered by the agent).
pub const TARGET_OPENED: u32 = 0x8000_0000;
