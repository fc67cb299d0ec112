//! The target's side of a channel: its messages relayed to the client and
//! recorded, and how the channel ended.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use gatehouse_audit::{Decision, EventKind};
use gatehouse_proto::tunnel::{SessionOpen, SshExitSignal, SshFrame, ssh_frame};
use gatehouse_recording::RecordEvent;
use russh::ChannelMsg;
use tokio::sync::mpsc;

use super::{ChanShared, Internal, Mode, Rec, file_op, file_ops, msg_frame, record, record_bytes};
use gatehouse_agent_core::AgentCtx;
use gatehouse_agent_core::session::base_event;

/// The target's side of one channel: its messages to the client, recorded.
#[allow(clippy::too_many_arguments)]
pub(super) async fn pump_target(
    mut read: russh::ChannelReadHalf,
    shared: Arc<ChanShared>,
    out: mpsc::Sender<SshFrame>,
    rec: Rec,
    cap: u64,
    internal: mpsc::Sender<Internal>,
    exits: Arc<Mutex<Vec<String>>>,
    ctx: Arc<AgentCtx>,
    open: Arc<SessionOpen>,
) {
    let id = shared.id;
    while let Some(msg) = read.wait().await {
        let frame = match msg {
            ChannelMsg::Data { data } => {
                shared
                    .bytes_out
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if !record_bytes(&rec, &shared, false, false, &data, cap) {
                    let _ = internal
                        .send(Internal::RecordingFailed("output".into()))
                        .await;
                }
                if let Ok(mut d) = shared.terminal.lock()
                    && let Some(d) = d.as_mut()
                {
                    d.output(&data);
                }
                let mut durable = true;
                for op in file_ops(&shared, &data, false) {
                    durable &= file_op(&rec, &ctx, &open, id, op).await;
                }
                if !durable {
                    // Fail closed: the bytes that completed the operation
                    // are not relayed, and the session ends.
                    let _ = internal
                        .send(Internal::RecordingFailed(
                            "a file operation's audit event could not be made durable".into(),
                        ))
                        .await;
                    break;
                }
                ssh_frame::Msg::Data(data.to_vec())
            }
            ChannelMsg::ExtendedData { data, .. } => {
                shared
                    .bytes_out
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if !record_bytes(&rec, &shared, false, true, &data, cap) {
                    let _ = internal
                        .send(Internal::RecordingFailed("output".into()))
                        .await;
                }
                ssh_frame::Msg::Stderr(data.to_vec())
            }
            ChannelMsg::Eof => ssh_frame::Msg::Eof(true),
            ChannelMsg::Close => break,
            ChannelMsg::Success => {
                shared.target_replied(&out, true).await;
                continue;
            }
            ChannelMsg::Failure => {
                shared.target_replied(&out, false).await;
                continue;
            }
            ChannelMsg::ExitStatus { exit_status } => {
                let _ = record(
                    &rec,
                    RecordEvent::Exit {
                        channel: id,
                        status: Some(exit_status),
                        signal: None,
                    },
                );
                exit_noted(
                    &exits,
                    &ctx,
                    &open,
                    &shared,
                    format!("exit status {exit_status}"),
                );
                ssh_frame::Msg::ExitStatus(exit_status)
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                ..
            } => {
                let name = gatehouse_proto::ssh::sig_name(&signal_name);
                let _ = record(
                    &rec,
                    RecordEvent::Exit {
                        channel: id,
                        status: None,
                        signal: Some(name.clone()),
                    },
                );
                exit_noted(
                    &exits,
                    &ctx,
                    &open,
                    &shared,
                    format!("killed by signal {name}"),
                );
                ssh_frame::Msg::ExitSignal(SshExitSignal {
                    signal: name,
                    core_dumped,
                    message: error_message,
                })
            }
            _ => continue,
        };
        if out.send(msg_frame(id, frame)).await.is_err() {
            break;
        }
    }
    let last = match shared.files.lock() {
        Ok(mut d) => d.as_mut().map(|d| d.finish()).unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    for op in last {
        let _ = file_op(&rec, &ctx, &open, id, op).await;
    }
    let _ = record(
        &rec,
        RecordEvent::ChannelClose {
            channel: id,
            bytes_in: shared.bytes_in.load(Ordering::Relaxed),
            bytes_out: shared.bytes_out.load(Ordering::Relaxed),
        },
    );
    if shared.mode() == Mode::Forward {
        let mut ev = base_event(&ctx, &open, EventKind::Forward, Decision::Allow);
        ev.detail = Some(format!(
            "forwarded connection on channel {id} closed: {} bytes in, {} bytes out",
            shared.bytes_in.load(Ordering::Relaxed),
            shared.bytes_out.load(Ordering::Relaxed)
        ));
        let _ = ctx.audit(ev).await;
    }
    let _ = out.send(msg_frame(id, ssh_frame::Msg::Close(true))).await;
}

/// A command's end: kept for the session's end event and audited.
fn exit_noted(
    exits: &Arc<Mutex<Vec<String>>>,
    ctx: &Arc<AgentCtx>,
    open: &Arc<SessionOpen>,
    shared: &ChanShared,
    how: String,
) {
    let what = match shared.mode() {
        Mode::Command(c) => c,
        Mode::Terminal => "terminal session".into(),
        Mode::Files => "file transfer".into(),
        _ => String::new(),
    };
    if let Ok(mut e) = exits.lock() {
        e.push(format!("channel {}: {how}", shared.id));
    }
    let mut ev = base_event(ctx, open, EventKind::Command, Decision::Allow);
    ev.statement = Some(what);
    ev.detail = Some(format!("channel {}: ended with {how}", shared.id));
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _ = ctx.audit(ev).await;
    });
}
