//! `GET /api/agents` a page at a time (`?limit=` and a cursor) and whole
//! (streamed): the pages together are exactly the whole listing, in the
//! listing's order; a cursor outlives the agent it names; bad paging is a
//! JSON 400; a listing taken while agents come and go names each at most
//! once and every agent that stayed. The memory bound is the benchmark's
//! (`rss_after_20_listings_mb`, BENCHMARKS.md).

mod support;

use futures::stream::{self, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use support::{client, config, register, registration, TestRouter};

async fn register_many(
    http: &reqwest::Client,
    base: &str,
    names: std::ops::Range<usize>,
) -> Vec<String> {
    stream::iter(names)
        .map(|n| {
            let (http, base) = (http.clone(), base.to_owned());
            async move { register(&http, &base, &registration(&format!("node-{n:05}"))).await }
        })
        .buffered(32)
        .collect()
        .await
}

fn ids(agents: &[Value]) -> Vec<String> {
    agents
        .iter()
        .map(|agent| agent["id"].as_str().expect("id").to_owned())
        .collect()
}

/// One page: its agents, its `X-Next-Cursor` and its `Link`.
async fn page(http: &reqwest::Client, url: &str) -> (Vec<Value>, Option<String>, Option<String>) {
    let response = http.get(url).send().await.expect("a page");
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| value.to_str().expect("ASCII").to_owned())
    };
    let (cursor, link) = (header("x-next-cursor"), header("link"));
    (response.json().await.expect("a JSON array"), cursor, link)
}

#[tokio::test]
async fn pages_together_are_the_whole_listing_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    let base = router.base();
    register_many(&http, &base, 0..1_050).await;

    let whole = http
        .get(router.url("/api/agents"))
        .send()
        .await
        .expect("list");
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["content-type"], "application/json");
    assert!(
        whole.headers().get("content-length").is_none(),
        "the whole listing is streamed, not built first"
    );
    assert!(
        whole.headers().get("link").is_none(),
        "one listing, no next page"
    );
    let whole: Vec<Value> = whole.json().await.expect("a JSON array");
    assert_eq!(whole.len(), 1_050);
    let order: Vec<(String, String)> = whole
        .iter()
        .map(|a| {
            (
                a["registered_at"].as_str().expect("time").to_owned(),
                a["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "oldest registration first, then id");

    // Following X-Next-Cursor.
    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    let mut url = router.url("/api/agents?limit=100");
    loop {
        let (agents, cursor, link) = page(&http, &url).await;
        sizes.push(agents.len());
        paged.extend(ids(&agents));
        match (cursor, link) {
            (Some(cursor), Some(link)) => {
                assert_eq!(
                    link,
                    format!("</api/agents?limit=100&after={cursor}>; rel=\"next\"")
                );
                url = router.url(&format!("/api/agents?limit=100&after={cursor}"));
            }
            (None, None) => break,
            other => panic!("a cursor and a Link go together: {other:?}"),
        }
    }
    assert_eq!(
        sizes,
        [100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 50]
    );
    assert_eq!(
        paged,
        ids(&whole),
        "the pages are the listing, each agent once"
    );

    // A page that ends exactly at the last agent says no more follow.
    let (agents, cursor, _) = page(&http, &router.url("/api/agents?limit=1050")).await;
    assert_eq!((agents.len(), cursor), (1_050, None));

    // Following Link, with a status: the filter goes on with the cursor.
    let (first, _, link) = page(&http, &router.url("/api/agents?limit=1000&status=online")).await;
    let link = link.expect("more than 1000 are Online");
    assert!(link.ends_with("&status=Online>; rel=\"next\""), "{link}");
    let next = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .expect("a target");
    let (rest, cursor, _) = page(&http, &router.url(next)).await;
    assert_eq!(cursor, None);
    assert_eq!([ids(&first), ids(&rest)].concat(), ids(&whole));
}

#[tokio::test]
async fn a_cursor_outlives_the_agent_it_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    let registered = register_many(&http, &router.base(), 0..30).await;
    let (first, cursor, _) = page(&http, &router.url("/api/agents?limit=10")).await;
    assert_eq!(ids(&first), registered[..10]);
    // The page's last agent leaves before the next page is read.
    let removed = http
        .delete(router.url(&format!("/api/agents/{}", registered[9])))
        .send()
        .await
        .expect("delete");
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    let cursor = cursor.expect("more follow");
    let (next, _, _) = page(
        &http,
        &router.url(&format!("/api/agents?limit=10&after={cursor}")),
    )
    .await;
    assert_eq!(ids(&next), registered[10..20]);
}

#[tokio::test]
async fn bad_paging_is_a_json_400_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    register_many(&http, &router.base(), 0..3).await;
    for (query, code, names) in [
        (
            "limit=0",
            "invalid_query",
            "limit must be a whole number from 1 to 10000",
        ),
        (
            "limit=10001",
            "invalid_query",
            "limit must be a whole number from 1 to 10000",
        ),
        ("limit=-5", "invalid_query", "limit must be"),
        ("limit=ten", "invalid_query", "limit must be"),
        (
            "after=somewhere",
            "invalid_cursor",
            "start again without `after`",
        ),
        (
            "limit=5&after=1.2.3",
            "invalid_cursor",
            "not a cursor this router gave",
        ),
        (
            "after=1.000000000.00000000000000000000000000000000.4",
            "invalid_cursor",
            "not a cursor",
        ),
    ] {
        let response = http
            .get(router.url(&format!("/api/agents?{query}")))
            .send()
            .await
            .expect("list");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
        let message = body["error"]["message"].as_str().expect("a message");
        assert!(message.contains(names), "{query}: {message}");
    }
    // A well-formed cursor past every agent: an empty last page.
    let (agents, cursor, _) = page(
        &http,
        &router
            .url("/api/agents?limit=5&after=4102444800.000000000.ffffffffffffffffffffffffffffffff"),
    )
    .await;
    assert_eq!((agents.len(), cursor), (0, None));
}

/// Registrations and deletions go on while the whole listing streams and
/// while pages are followed: no agent twice, and every agent that was
/// there throughout is listed.
#[tokio::test]
async fn a_listing_taken_while_agents_come_and_go_names_each_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    let base = router.base();
    let stayers = register_many(&http, &base, 0..1_500).await;
    let leavers = register_many(&http, &base, 1_500..2_000).await;

    let churn = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            for (n, id) in leavers.iter().enumerate() {
                let _ = http.delete(format!("{base}/api/agents/{id}")).send().await;
                register(&http, &base, &registration(&format!("late-{n:05}"))).await;
            }
        })
    };
    for _ in 0..5 {
        let whole: Vec<Value> = http
            .get(router.url("/api/agents"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("a whole JSON array, though agents came and went");
        let mut paged = Vec::new();
        let mut url = router.url("/api/agents?limit=97");
        loop {
            let (agents, cursor, _) = page(&http, &url).await;
            paged.extend(ids(&agents));
            let Some(cursor) = cursor else { break };
            url = router.url(&format!("/api/agents?limit=97&after={cursor}"));
        }
        for listed in [ids(&whole), paged] {
            let unique: std::collections::HashSet<&String> = listed.iter().collect();
            assert_eq!(unique.len(), listed.len(), "an agent listed twice");
            for id in &stayers {
                assert!(
                    unique.contains(id),
                    "agent {id} was there throughout but not listed"
                );
            }
        }
    }
    churn.await.expect("churn");
}
