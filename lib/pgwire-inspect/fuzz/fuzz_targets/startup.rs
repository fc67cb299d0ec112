//! What the ingress decodes before a client is authenticated (SSL and GSS
//! negotiation, StartupMessage, CancelRequest, the password message), with
//! pgwire's frontend decoder in each of the ingress's states, behind the
//! length check the ingress makes first.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwire::messages::{DecodeContext, PgWireFrontendMessage};

fuzz_target!(|data: &[u8]| {
    for state in 0..3 {
        let mut ctx = DecodeContext::default();
        ctx.awaiting_frontend_ssl = state == 0;
        ctx.awaiting_frontend_startup = state <= 1;
        let mut buf = BytesMut::from(data);
        // Negotiation answers decode without consuming (the ingress changes
        // state after each); stop when nothing was consumed.
        for _ in 0..16 {
            let before = buf.len();
            // The ingress checks the length before handing bytes to pgwire.
            if !gatehouse_pgwire_inspect::frontend_length_ok(&buf, ctx.awaiting_frontend_startup) {
                break;
            }
            // After startup the ingress reads only a password message.
            if !ctx.awaiting_frontend_startup && buf.first().is_some_and(|t| *t != b'p') {
                break;
            }
            match PgWireFrontendMessage::decode(&mut buf, &ctx) {
                Ok(Some(PgWireFrontendMessage::PasswordMessageFamily(p))) => {
                    let _ = p.into_password();
                }
                Ok(Some(_)) if buf.len() < before => {}
                _ => break,
            }
        }
    }
});
