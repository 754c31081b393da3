//! cqrs.append under real concurrency: parallel sessions on one cluster.

use std::sync::Arc;

use cqrs_e2e::connect;
use cqrs_harness::{ClusterOptions, PgCluster};
use tokio::sync::Barrier;
use uuid::Uuid;

const SESSIONS: usize = 16;

/// N sessions append to one stream with the same expected_seq at the same moment: exactly one
/// wins, the others get 40001, and the stream's seqs stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_expected_seq_exactly_one_wins() -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let setup = connect(&cluster.url()).await?;
    setup
        .execute(
            "select cqrs.append(cqrs.uuid_v7(), 'race', 'CREATE', '{}', expected_seq => 0)",
            &[],
        )
        .await?;

    for round in 1..=5i64 {
        let barrier = Arc::new(Barrier::new(SESSIONS));
        let mut tasks = Vec::new();
        for _ in 0..SESSIONS {
            let url = cluster.url();
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                let client = connect(&url).await?;
                barrier.wait().await;
                let result = client
                    .query_one(
                        "select seq from cqrs.append($1, 'race', 'ADD', '{}', expected_seq => $2)",
                        &[&Uuid::new_v4(), &round],
                    )
                    .await;
                anyhow::Ok(match result {
                    Ok(row) => Ok(row.get::<_, i64>(0)),
                    Err(err) => Err(err.code().map(|c| c.code().to_owned()).unwrap_or_default()),
                })
            }));
        }
        let mut wins = Vec::new();
        let mut codes = Vec::new();
        for task in tasks {
            match task.await?? {
                Ok(seq) => wins.push(seq),
                Err(code) => codes.push(code),
            }
        }
        assert_eq!(wins, vec![round + 1], "round {round}: exactly one append may win");
        assert!(
            codes.iter().all(|c| c == "40001"),
            "round {round}: losers must get 40001, got {codes:?}"
        );
        assert_eq!(codes.len(), SESSIONS - 1);
    }

    let seqs: Vec<i64> = setup
        .query(
            "select seq from cqrs.command_log where stream = 'race' order by seq",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>(), "seqs must be gap-free");
    let last: i64 = setup
        .query_one("select last_seq from cqrs.stream where stream = 'race'", &[])
        .await?
        .get(0);
    assert_eq!(last, 6);
    Ok(())
}

/// N sessions replay one command id at the same moment (a client retrying while its first
/// attempt is still in flight): one row, one seq, everyone gets the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replays_of_one_command_write_one_row() -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let setup = connect(&cluster.url()).await?;

    for (round, stream) in ["existing", "fresh-1", "fresh-2", "existing"].iter().enumerate() {
        if round == 0 {
            setup
                .execute(
                    "select cqrs.append(cqrs.uuid_v7(), 'existing', 'CREATE', '{}')",
                    &[],
                )
                .await?;
        }
        let id = Uuid::new_v4();
        let barrier = Arc::new(Barrier::new(SESSIONS));
        let mut tasks = Vec::new();
        for _ in 0..SESSIONS {
            let url = cluster.url();
            let barrier = Arc::clone(&barrier);
            let stream = stream.to_string();
            tasks.push(tokio::spawn(async move {
                let client = connect(&url).await?;
                barrier.wait().await;
                let row = client
                    .query_one(
                        "select position, seq, duplicate from cqrs.append($1, $2, 'PAY', '{\"amount\": 10}')",
                        &[&id, &stream],
                    )
                    .await?;
                anyhow::Ok((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, bool>(2)))
            }));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await??);
        }
        let originals = answers.iter().filter(|a| !a.2).count();
        assert_eq!(
            originals, 1,
            "exactly one session appends, the rest are duplicates: {answers:?}"
        );
        let (position, seq, _) = answers[0];
        assert!(
            answers.iter().all(|a| a.0 == position && a.1 == seq),
            "everyone sees the same command: {answers:?}"
        );
        let rows: i64 = setup
            .query_one(
                "select count(*) from cqrs.command_log where command_id = $1",
                &[&id],
            )
            .await?
            .get(0);
        assert_eq!(rows, 1);
    }

    // no seq was lost or duplicated by the races
    let bad: i64 = setup
        .query_one(
            "select count(*) from cqrs.stream s
              where s.last_seq <> (select count(*) from cqrs.command_log l where l.stream = s.stream)
                 or s.last_seq <> (select max(seq) from cqrs.command_log l where l.stream = s.stream)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        bad, 0,
        "every stream's last_seq equals its command count and max seq"
    );
    Ok(())
}

/// Many sessions appending to many streams at once keep every stream gap-free and consistent
/// with cqrs.stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_appends_keep_every_stream_gap_free() -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let mut tasks = Vec::new();
    for session in 0..SESSIONS {
        let url = cluster.url();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let statement = client
                .prepare("select seq from cqrs.append($1, $2, 'T', '{}')")
                .await?;
            for i in 0..200usize {
                let stream = format!("s-{}", (i * 7 + session) % 10);
                client.query_one(&statement, &[&Uuid::new_v4(), &stream]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let client = connect(&cluster.url()).await?;
    let row = client
        .query_one(
            "select count(*), count(distinct (stream, seq)),
                    (select count(*) from cqrs.stream s
                      where s.last_seq <> (select count(*) from cqrs.command_log l where l.stream = s.stream)
                         or s.last_seq <> (select max(seq) from cqrs.command_log l where l.stream = s.stream))
               from cqrs.command_log",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, i64>(0), (SESSIONS * 200) as i64);
    assert_eq!(row.get::<_, i64>(1), (SESSIONS * 200) as i64);
    assert_eq!(row.get::<_, i64>(2), 0);
    Ok(())
}
