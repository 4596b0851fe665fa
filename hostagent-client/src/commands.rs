//! Executing one control-plane command against the runtime. Every command gets
//! a `CommandResult`; a malformed one gets `ok: false`, never a panic.

use std::sync::Arc;
use std::time::Instant;

use switchboard_proto::v1::command::Kind;
use switchboard_proto::v1::{
    AssignMandelbox, Command, CommandResult, ReplacementResult, SpawnMandelbox, TeardownMandelbox,
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::handle::Shared;
use crate::runtime::{AssignSpec, MandelboxRuntime, RuntimeError, SpawnSpec};

/// Longest id the agent accepts from the control plane.
const MAX_ID_LEN: usize = 256;

/// What a command needs; one per connection.
#[derive(Clone)]
pub(crate) struct CommandContext {
    pub(crate) runtime: Arc<dyn MandelboxRuntime>,
    pub(crate) shared: Arc<Shared>,
    /// Where boxes report disconnects (from the Welcome).
    pub(crate) session_events_endpoint: String,
}

pub(crate) fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        Some(Kind::Spawn(_)) => "spawn",
        Some(Kind::Assign(_)) => "assign",
        Some(Kind::Teardown(_)) => "teardown",
        Some(Kind::Drain(_)) => "drain",
        None => "none",
    }
}

/// Runs `command` and builds its result. Logs never include tokens or keys.
pub(crate) async fn execute(ctx: &CommandContext, command: Command) -> CommandResult {
    let kind = kind_name(command.kind.as_ref());
    let span = info_span!("command", command_id = command.command_id, kind, traceparent = tracing::field::Empty);
    if !command.traceparent.is_empty() {
        span.record("traceparent", command.traceparent.as_str());
    }
    let command_id = command.command_id.clone();
    async move {
        let started = Instant::now();
        let outcome = if command_id.is_empty() {
            Err("missing command_id".to_owned())
        } else {
            match command.kind {
                Some(Kind::Spawn(spawn)) => run_spawn(ctx, spawn).await,
                Some(Kind::Assign(assign)) => run_assign(ctx, assign).await,
                Some(Kind::Teardown(teardown)) => run_teardown(ctx, teardown).await,
                Some(Kind::Drain(drain)) => {
                    info!(reason = drain.reason, "draining");
                    ctx.shared.status.send_modify(|s| s.draining = true);
                    Ok(CommandResult::default())
                }
                None => Err("command has no kind (unknown or missing)".to_owned()),
            }
        };
        let result = match outcome {
            Ok(done) => CommandResult { command_id, ok: true, error: String::new(), ..done },
            Err(error) => CommandResult {
                command_id,
                ok: false,
                error: if error.is_empty() { "command failed".to_owned() } else { error },
                ..CommandResult::default()
            },
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if result.ok {
            debug!(elapsed_ms, "command done");
        } else {
            warn!(elapsed_ms, error = result.error, "command failed");
        }
        result
    }
    .instrument(span)
    .await
}

async fn run_spawn(ctx: &CommandContext, spawn: SpawnMandelbox) -> Result<CommandResult, String> {
    check_id("mandelbox_id", &spawn.mandelbox_id)?;
    debug!(mandelbox_id = spawn.mandelbox_id, app = spawn.app, "spawning mandelbox");
    let spec = SpawnSpec {
        mandelbox_id: spawn.mandelbox_id,
        app: spawn.app,
        disconnect_token: spawn.disconnect_token,
        session_events_endpoint: ctx.session_events_endpoint.clone(),
    };
    let ports = ctx.runtime.spawn(spec).await.map_err(|e| e.to_string())?;
    Ok(CommandResult { ports, ..CommandResult::default() })
}

async fn run_assign(ctx: &CommandContext, assign: AssignMandelbox) -> Result<CommandResult, String> {
    check_id("mandelbox_id", &assign.mandelbox_id)?;
    check_id("session_id", &assign.session_id)?;
    info!(
        mandelbox_id = assign.mandelbox_id,
        session_id = assign.session_id,
        user_id = assign.user_id,
        "assigning mandelbox"
    );
    let spec = AssignSpec {
        mandelbox_id: assign.mandelbox_id,
        session_id: assign.session_id,
        user_id: assign.user_id,
        client_data_json: assign.client_data_json,
        config_encryption_token: assign.config_encryption_token,
    };
    let assignment = ctx.runtime.assign(spec).await.map_err(|e| e.to_string())?;
    if assignment.session_key.is_empty() {
        return Err("runtime returned no session key".to_owned());
    }
    Ok(CommandResult { ports: assignment.ports, session_key: assignment.session_key, ..CommandResult::default() })
}

/// Tears a box down and, when the command names one, spawns its replacement
/// in the freed slot: the result's `ok` is the teardown's, and its
/// `replacement` says whether the new box runs (its ports are the result's).
async fn run_teardown(ctx: &CommandContext, teardown: TeardownMandelbox) -> Result<CommandResult, String> {
    check_id("mandelbox_id", &teardown.mandelbox_id)?;
    info!(mandelbox_id = teardown.mandelbox_id, reason = teardown.reason, "tearing down mandelbox");
    match ctx.runtime.teardown(&teardown.mandelbox_id).await {
        // Teardown is idempotent: a box that is already gone is torn down.
        Ok(()) | Err(RuntimeError::NotFound(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    let Some(replacement) = teardown.replacement else {
        return Ok(CommandResult::default());
    };
    // A Drain may have overtaken the teardown: a draining host starts nothing.
    if ctx.shared.status.borrow().draining {
        debug!(mandelbox_id = replacement.mandelbox_id, "draining: replacement not spawned");
        return Ok(replaced(Err("host is draining".to_owned())));
    }
    Ok(replaced(run_spawn(ctx, replacement).await))
}

/// A teardown's result with its replacement's outcome.
fn replaced(spawn: Result<CommandResult, String>) -> CommandResult {
    match spawn {
        Ok(spawned) => {
            CommandResult { replacement: Some(ReplacementResult { spawned: true, error: String::new() }), ..spawned }
        }
        Err(error) => {
            warn!(%error, "replacement not spawned");
            CommandResult { replacement: Some(ReplacementResult { spawned: false, error }), ..CommandResult::default() }
        }
    }
}

fn check_id(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("missing {field}"));
    }
    if value.len() > MAX_ID_LEN || value.chars().any(char::is_control) {
        return Err(format!("malformed {field}"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use switchboard_proto::v1::DrainHost;

    use super::*;
    use crate::LocalRuntime;

    fn ctx() -> CommandContext {
        CommandContext {
            runtime: Arc::new(LocalRuntime::new()),
            shared: Arc::new(Shared::new()),
            session_events_endpoint: String::new(),
        }
    }

    fn command(id: &str, kind: Option<Kind>) -> Command {
        Command { command_id: id.to_owned(), kind, traceparent: String::new() }
    }

    fn spawn(id: &str) -> Option<Kind> {
        Some(Kind::Spawn(SpawnMandelbox {
            mandelbox_id: id.to_owned(),
            app: "chrome".to_owned(),
            disconnect_token: "t".to_owned(),
        }))
    }

    #[tokio::test]
    async fn malformed_commands_fail_without_panicking() {
        let ctx = ctx();
        let r = execute(&ctx, command("c1", None)).await;
        assert_eq!((r.command_id.as_str(), r.ok), ("c1", false));
        assert!(r.error.contains("no kind"), "{}", r.error);

        let r = execute(&ctx, command("", spawn("mb"))).await;
        assert_eq!((r.ok, r.error.as_str()), (false, "missing command_id"));

        let r = execute(&ctx, command("c2", spawn(""))).await;
        assert_eq!((r.ok, r.error.as_str()), (false, "missing mandelbox_id"));

        let r = execute(&ctx, command("c3", spawn("bad\nid"))).await;
        assert_eq!((r.ok, r.error.as_str()), (false, "malformed mandelbox_id"));

        let assign = Kind::Assign(AssignMandelbox {
            mandelbox_id: "nope".to_owned(),
            session_id: "s".to_owned(),
            ..AssignMandelbox::default()
        });
        let r = execute(&ctx, command("c4", Some(assign))).await;
        assert_eq!((r.ok, r.error.as_str()), (false, "mandelbox nope not found"));
        assert!(r.session_key.is_empty());
    }

    #[tokio::test]
    async fn spawn_assign_teardown_drain() {
        let ctx = ctx();
        let r = execute(&ctx, command("c1", spawn("mb-1"))).await;
        assert!(r.ok, "{}", r.error);
        assert_eq!(r.ports.len(), 1);
        let assign = Kind::Assign(AssignMandelbox {
            mandelbox_id: "mb-1".to_owned(),
            session_id: "s-1".to_owned(),
            user_id: "u-1".to_owned(),
            client_data_json: "{}".to_owned(),
            config_encryption_token: "secret".to_owned(),
        });
        let r = execute(&ctx, command("c2", Some(assign))).await;
        assert!(r.ok, "{}", r.error);
        assert_eq!(r.session_key.len(), 32);
        assert_eq!(r.ports.len(), 1);

        let teardown = || {
            Some(Kind::Teardown(TeardownMandelbox {
                mandelbox_id: "mb-1".to_owned(),
                reason: "test".to_owned(),
                replacement: None,
            }))
        };
        let r = execute(&ctx, command("c3", teardown())).await;
        assert!(r.ok && r.error.is_empty());
        let r = execute(&ctx, command("c4", teardown())).await;
        assert!(r.ok, "teardown is idempotent: {}", r.error);
        assert!(ctx.runtime.running().is_empty());

        assert!(!ctx.shared.status.borrow().draining);
        let drain = Kind::Drain(DrainHost { reason: "maintenance".to_owned() });
        let r = execute(&ctx, command("c5", Some(drain))).await;
        assert!(r.ok);
        assert!(ctx.shared.status.borrow().draining);
    }

    fn teardown_replacing(id: &str, replacement: &str) -> Option<Kind> {
        Some(Kind::Teardown(TeardownMandelbox {
            mandelbox_id: id.to_owned(),
            reason: "test".to_owned(),
            replacement: Some(SpawnMandelbox {
                mandelbox_id: replacement.to_owned(),
                app: "chrome".to_owned(),
                disconnect_token: "t2".to_owned(),
            }),
        }))
    }

    fn running(ctx: &CommandContext) -> Vec<String> {
        let mut ids: Vec<String> = ctx.runtime.running().into_iter().map(|b| b.mandelbox_id).collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn a_teardown_spawns_its_replacement_in_the_same_command() {
        let ctx = ctx();
        assert!(execute(&ctx, command("c1", spawn("mb-1"))).await.ok);

        let r = execute(&ctx, command("c2", teardown_replacing("mb-1", "mb-2"))).await;
        assert!(r.ok, "{}", r.error);
        let replacement = r.replacement.unwrap();
        assert!(replacement.spawned && replacement.error.is_empty(), "{replacement:?}");
        assert_eq!(r.ports.len(), 1, "the replacement's ports");
        assert_eq!(running(&ctx), ["mb-2"]);

        // A box already gone is torn down; its replacement still starts.
        let r = execute(&ctx, command("c3", teardown_replacing("mb-1", "mb-3"))).await;
        assert!(r.ok && r.replacement.unwrap().spawned);
        assert_eq!(running(&ctx), ["mb-2", "mb-3"]);

        // A replacement that cannot start leaves the teardown done.
        let r = execute(&ctx, command("c4", teardown_replacing("mb-2", "bad\nid"))).await;
        assert!(r.ok, "the teardown itself succeeded");
        let replacement = r.replacement.unwrap();
        assert_eq!((replacement.spawned, replacement.error.as_str()), (false, "malformed mandelbox_id"));
        assert!(r.ports.is_empty());
        assert_eq!(running(&ctx), ["mb-3"]);
    }

    #[tokio::test]
    async fn a_draining_host_tears_down_without_replacing() {
        let ctx = ctx();
        assert!(execute(&ctx, command("c1", spawn("mb-1"))).await.ok);
        let drain = Kind::Drain(DrainHost { reason: "maintenance".to_owned() });
        assert!(execute(&ctx, command("c2", Some(drain))).await.ok);

        let r = execute(&ctx, command("c3", teardown_replacing("mb-1", "mb-2"))).await;
        assert!(r.ok, "{}", r.error);
        let replacement = r.replacement.unwrap();
        assert_eq!((replacement.spawned, replacement.error.as_str()), (false, "host is draining"));
        assert!(running(&ctx).is_empty());
    }

    #[tokio::test]
    async fn a_failed_teardown_spawns_nothing() {
        let ctx = ctx();
        let r = execute(&ctx, command("c1", teardown_replacing("bad\nid", "mb-2"))).await;
        assert_eq!((r.ok, r.error.as_str()), (false, "malformed mandelbox_id"));
        assert!(r.replacement.is_none());
        assert!(running(&ctx).is_empty());
    }
}
