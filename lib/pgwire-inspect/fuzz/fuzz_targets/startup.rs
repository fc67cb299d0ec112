//! What the ingress decodes before a client is authenticated (SSL and GSS
//! negotiation, StartupMessage, CancelRequest, the password message), with
//! pgwire's frontend decoder in each of the ingress's states.
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
        while let Ok(Some(_)) = PgWireFrontendMessage::decode(&mut buf, &ctx) {}
    }
});
