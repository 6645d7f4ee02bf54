//! The schema transform through the real pipeline, and `weir validate` and
//! `weir test` as CI runs them.

use std::time::Duration;

use crate::support::*;

const ORDER_OK: &str = r#"{"event_type": "order.created", "service": "order-service", "version": "1.0", "timestamp": "2026-11-29T12:49:29.640Z", "payload": {"organization_id": "5c6a0508-1559-43a2-a849-7393fead9091", "order_id": "7e3f5318-a379-4365-a7bd-70bd90384799", "customer_id": "c7fd33ec-23a0-4714-bce8-234f75065efc", "lines": [{"sku": "SKU-00001", "qty": 1, "unit_price": 12.5}], "total": 12.5, "currency": "EUR"}, "metadata": {"event_id": "00000000-0000-4000-8000-000000000001"}}"#;

const OK_ID: &str = "00000000-0000-4000-8000-000000000001";
const UNKNOWN_ID: &str = "00000000-0000-4000-8000-000000000005";

fn variant(id: &str, from: &str, to: &str) -> String {
    let s = ORDER_OK.replace(
        "\"00000000-0000-4000-8000-000000000001\"",
        &format!("\"{id}\""),
    );
    assert!(s.contains(from), "test body must contain {from}");
    s.replacen(from, to, 1)
}

/// Bad events of each kind, with the text their reason must contain.
fn bad_events() -> Vec<(String, &'static str)> {
    vec![
        (
            variant(
                "00000000-0000-4000-8000-000000000002",
                "\"total\": 12.5",
                "\"total\": \"12.5\"",
            ),
            "/payload/total: type",
        ),
        (
            variant(
                "00000000-0000-4000-8000-000000000003",
                "\"order_id\": \"7e3f5318-a379-4365-a7bd-70bd90384799\", ",
                "",
            ),
            "/payload: required",
        ),
        (
            variant(
                "00000000-0000-4000-8000-000000000004",
                "2026-11-29T12:49:29.640Z",
                "29/11/2026",
            ),
            "/timestamp: format",
        ),
    ]
}

fn unknown_type() -> String {
    ORDER_OK.replace("order.created", "invoice.issued").replace(
        "\"00000000-0000-4000-8000-000000000001\"",
        "\"00000000-0000-4000-8000-000000000005\"",
    )
}

async fn run_policy(
    test: &str,
    on_missing: &str,
    on_invalid: &str,
) -> Result<(TestEnv, Vec<DeadLetter>)> {
    let env = TestEnv::new(test).await?;
    let path =
        env.write_pipeline(&env.pipeline_text("", "", &schema_transform(on_missing, on_invalid)))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let mut bodies: Vec<String> = bad_events().into_iter().map(|(b, _)| b).collect();
    bodies.push(unknown_type());
    bodies.push(ORDER_OK.to_string());
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    env.publish_lines(&refs).await?;
    // The valid event comes last; once it is stored, the others are settled.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let ok: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE event_id = '00000000-0000-4000-8000-000000000001'")
            .fetch_one(&env.db)
            .await?;
        if ok == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = env.take_dead_letters(10, Duration::from_secs(2)).await?;
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    Ok((env, dead))
}

async fn stored_ids(env: &TestEnv) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT event_id FROM audit_logs ORDER BY event_id")
            .fetch_all(&env.db)
            .await?,
    )
}

#[tokio::test]
async fn default_policies_dead_letter_invalid_events_and_store_unknown_types() -> Result {
    let (env, dead) = run_policy("schema_default", "store", "dead_letter").await?;
    assert_eq!(stored_ids(&env).await?, vec![OK_ID, UNKNOWN_ID]);
    assert_eq!(dead.len(), 3);
    for (body, want) in bad_events() {
        let d = dead
            .iter()
            .find(|d| d.body == body.as_bytes())
            .expect("each invalid event is dead-lettered");
        let reason = d.header("x-weir-reason").unwrap_or_default();
        assert!(reason.contains(want), "{reason:?} should contain {want:?}");
        assert_eq!(d.header("x-weir-reason-class").as_deref(), Some("schema"));
        assert_eq!(d.header("x-weir-stage").as_deref(), Some("schema"));
    }
    env.cleanup().await
}

#[tokio::test]
async fn strict_policy_dead_letters_unknown_types_too() -> Result {
    let (env, dead) = run_policy("schema_strict", "dead_letter", "dead_letter").await?;
    assert_eq!(stored_ids(&env).await?, vec![OK_ID]);
    assert_eq!(dead.len(), 4);
    let unknown = dead
        .iter()
        .find(|d| d.body == unknown_type().as_bytes())
        .expect("unknown type dead-lettered");
    let reason = unknown.header("x-weir-reason").unwrap_or_default();
    assert!(
        reason.contains("no schema for event_type `invoice.issued`"),
        "{reason}"
    );
    env.cleanup().await
}

#[tokio::test]
async fn lenient_policies_store_or_drop_without_dead_letters() -> Result {
    let (env, dead) = run_policy("schema_store", "drop", "store").await?;
    assert_eq!(
        stored_ids(&env).await?,
        vec![
            OK_ID,
            "00000000-0000-4000-8000-000000000002",
            "00000000-0000-4000-8000-000000000003",
            "00000000-0000-4000-8000-000000000004"
        ]
    );
    assert!(dead.is_empty(), "nothing is dead-lettered");
    assert_eq!(
        env.queue_depth(&env.queue()).await?,
        0,
        "the dropped event is acked"
    );
    env.cleanup().await
}

#[tokio::test]
async fn a_schema_that_does_not_compile_stops_run_and_fails_validate() -> Result {
    let env = TestEnv::new("schema_broken").await?;
    let dir = env.dir.path().join("schemas");
    std::fs::create_dir_all(dir.join("order.created"))?;
    std::fs::write(
        dir.join("order.created/1.0.json"),
        r#"{"type": "object", "properties": {"total": {"type": "decimal"}}}"#,
    )?;
    let transform = format!(
        "[[transforms]]\ntype = \"schema\"\ndir = \"{}\"\n",
        dir.display()
    );
    let path = env.write_pipeline(&env.pipeline_text("", "", &transform))?;

    let weir = env.spawn(&path)?;
    let (status, log) = weir.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("order.created/1.0.json"),
        "the error names the file:\n{log}"
    );

    let (status, out, _) = weir_cmd(&["validate", path.to_str().unwrap_or_default()])?;
    assert!(!status.success());
    assert!(
        out.contains("order.created/1.0.json:1: schema does not compile"),
        "{out}"
    );

    std::fs::write(
        dir.join("order.created/1.0.json"),
        r#"{"$ref": "../_common/missing.json"}"#,
    )?;
    let (status, out, _) = weir_cmd(&["validate", path.to_str().unwrap_or_default()])?;
    assert!(!status.success());
    assert!(
        out.contains("missing.json"),
        "a missing referenced file is named: {out}"
    );
    env.cleanup().await
}

#[test]
fn validate_reports_an_unknown_key_with_file_and_line() -> Result {
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(project_root().join("pipelines/audit.toml"))?
        .replace("prefetch = 50", "prefetch = 50\nprefech = 10");
    let line = text
        .lines()
        .position(|l| l.starts_with("prefech"))
        .expect("inserted")
        + 1;
    let path = dir.path().join("audit.toml");
    std::fs::write(&path, text)?;
    let p = path.to_str().unwrap_or_default();

    let (status, out, _) = weir_cmd(&["validate", p])?;
    assert!(!status.success());
    assert!(
        out.starts_with(&format!(
            "{p}:{line}: source.prefech: unknown field `prefech`"
        )),
        "{out}"
    );
    let (_, out, _) = weir_cmd(&["validate", "--format", "github", p])?;
    assert!(
        out.starts_with(&format!("::error file={p},line={line}::")),
        "{out}"
    );
    Ok(())
}

#[test]
fn shipped_pipelines_validate_and_their_fixtures_pass() -> Result {
    let (status, out, err) = weir_cmd(&["validate"])?;
    assert!(status.success(), "{out}{err}");
    let (status, out, _) = weir_cmd(&["test", "pipelines/audit.toml"])?;
    assert!(status.success(), "{out}");
    assert!(out.contains(" 0 failed"), "{out}");
    Ok(())
}

#[test]
fn weir_test_fails_when_an_expectation_changes() -> Result {
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(project_root().join("fixtures/invalid.toml"))?;
    let changed = text.replacen(
        "reason = \"/payload/total: type\"",
        "reason = \"/payload/total: minimum\"",
        1,
    );
    assert_ne!(text, changed);
    std::fs::write(dir.path().join("invalid.toml"), changed)?;
    let (status, out, _) = weir_cmd(&[
        "test",
        "pipelines/audit.toml",
        "--fixtures",
        dir.path().to_str().unwrap_or_default(),
    ])?;
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("a wrong type in the payload"),
        "{out}"
    );
    Ok(())
}
