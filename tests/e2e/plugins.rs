//! WASM plugins through the real pipeline: a plugin that misbehaves fails
//! only the event it was given, and the audit plugins' work shows in the
//! stored rows.

use std::time::Duration;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(60);

fn plugin_path(name: &str) -> String {
    project_root()
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

fn wasm_stage(name: &str, extra: &str) -> String {
    format!(
        "[[transforms]]\ntype = \"wasm\"\nname = \"{name}\"\npath = \"{}\"\n{extra}\n",
        plugin_path(name)
    )
}

fn event(n: u32, flag: Option<&str>) -> String {
    let flag = flag.map(|f| format!(", \"{f}\": true")).unwrap_or_default();
    format!(
        r#"{{"event_type": "stock.adjusted", "service": "inventory-service", "payload": {{"n": {n}{flag}}}, "metadata": {{"event_id": "plugin-test-{n}"}}}}"#
    )
}

#[tokio::test]
async fn misbehaving_plugins_fail_only_their_event() -> Result {
    let env = TestEnv::new("bad_plugins").await?;
    let transforms = [
        wasm_stage("looper", "fuel = 20_000_000"),
        wasm_stage("trapper", ""),
        wasm_stage("hog", "max_memory = \"8MiB\""),
        wasm_stage("garbage", ""),
    ]
    .concat();
    let path = env.write_pipeline(&env.pipeline_text("", "", &transforms))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(60)).await?;

    let flags = [
        None,
        Some("loop"),
        None,
        Some("trap"),
        None,
        Some("hog"),
        None,
        Some("garbage"),
        None,
    ];
    let bodies: Vec<String> = flags
        .iter()
        .enumerate()
        .map(|(i, f)| event(i as u32, *f))
        .collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    env.publish_lines(&refs).await?;

    assert_eq!(
        env.wait_rows(5, LIMIT).await?,
        5,
        "log:\n{}",
        weir.log_text()
    );
    let dead = env.take_dead_letters(4, Duration::from_secs(20)).await?;
    assert_eq!(dead.len(), 4, "log:\n{}", weir.log_text());
    let expect = [
        (1, "looper", "ran out of fuel"),
        (3, "trapper", "trapped"),
        (5, "hog", "ran out of memory"),
        (7, "garbage", "not a JSON object"),
    ];
    for (i, stage, cause) in expect {
        let d = dead
            .iter()
            .find(|d| d.body == bodies[i].as_bytes())
            .unwrap_or_else(|| panic!("event {i} is dead-lettered"));
        assert_eq!(d.header("x-weir-stage").as_deref(), Some(stage));
        assert_eq!(d.header("x-weir-reason-class").as_deref(), Some("plugin"));
        let reason = d.header("x-weir-reason").unwrap_or_default();
        assert!(
            reason.contains(cause) && reason.contains(stage),
            "{reason:?} should name {stage} and {cause:?}"
        );
    }
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM audit_logs ORDER BY event_id")
            .fetch_all(&env.db)
            .await?;
    assert_eq!(
        stored,
        [
            "plugin-test-0",
            "plugin-test-2",
            "plugin-test-4",
            "plugin-test-6",
            "plugin-test-8"
        ]
    );
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    env.cleanup().await
}

#[tokio::test]
async fn stored_rows_carry_enrichment_and_no_readable_email() -> Result {
    let text = match shared_sample() {
        Some(t) => t,
        None => own_sample()?,
    };
    let distinct = distinct_lines(&text) as i64;
    let env = TestEnv::new("enriched").await?;
    let path = env.write_pipeline(&env.pipeline_text("", "", &audit_transforms()?))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(60)).await?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    env.publish_lines(&lines).await?;
    assert_eq!(
        env.wait_rows(distinct, LIMIT).await?,
        distinct,
        "log:\n{}",
        weir.log_text()
    );

    let email = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}";
    let readable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE payload::text ~ $1 OR metadata::text ~ $1 OR coalesce(user_agent, '') ~ $1",
    )
    .bind(email)
    .fetch_one(&env.db)
    .await?;
    assert_eq!(readable, 0, "no stored row shows an email address");
    let hashed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE payload->>'email' LIKE 'hmac-sha256:%'",
    )
    .fetch_one(&env.db)
    .await?;
    assert!(hashed > 0, "emails are kept as keyed hashes");

    let no_severity: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE metadata->>'severity' IS NULL")
            .fetch_one(&env.db)
            .await?;
    assert_eq!(no_severity, 0, "every row has a severity");
    let high: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT event_type FROM audit_logs WHERE metadata->>'severity' = 'high' ORDER BY 1",
    )
    .fetch_all(&env.db)
    .await?;
    assert_eq!(high, ["user.login_failed", "user.role_granted"]);
    let wrong_actor: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE metadata ? 'user_id' AND metadata->>'actor' IS DISTINCT FROM metadata->>'user_id'",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!(wrong_actor, 0, "the actor is the metadata's user_id");
    let with_agent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE user_agent IS NOT NULL AND metadata->'user_agent_info'->>'browser' IS NULL",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!(with_agent, 0, "every user agent is described");
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert_eq!(env.queue_depth(&env.dlq()).await?, 0);
    env.cleanup().await
}

#[tokio::test]
async fn a_plugin_built_for_another_contract_version_is_refused_by_name() -> Result {
    let env = TestEnv::new("old_abi").await?;
    let path = env.write_pipeline(&env.pipeline_text("", "", &wasm_stage("oldabi", "")))?;
    let weir = env.spawn(&path)?;
    let (status, log) = weir.wait_exit(Duration::from_secs(60))?;
    assert!(!status.success(), "{log}");
    assert!(log.contains("oldabi.wasm"), "names the plugin file:\n{log}");
    assert!(
        log.contains("weir:plugin@0.9.0") && log.contains("weir:plugin@1.0.0"),
        "names both versions:\n{log}"
    );

    let (status, out, _) = weir_cmd(&["validate", path.to_str().unwrap_or_default()])?;
    assert!(!status.success());
    assert!(
        out.contains("transform `oldabi`") && out.contains("0.9.0"),
        "{out}"
    );
    env.cleanup().await
}
