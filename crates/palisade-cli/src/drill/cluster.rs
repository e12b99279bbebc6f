//! Forged records in the cluster's Redis as an attack of the catalog
//! (the records themselves are [`super::forged`]'s): planted while the
//! legitimate population runs, judged by what the node refused and
//! applied, then taken out again.

use anyhow::{Context as _, bail};

use super::attack::{Attack, BoxFuture, Budget, Ctx, Outcome, budget};
use super::forged::{Forgery, unauthenticated};
use super::relay::in_host;

/// The forgery as an attack of the catalog: plant, let the nodes read it
/// while the legitimate population runs, judge, take it out.
pub struct ForgedRedis;

impl Attack for ForgedRedis {
    fn name(&self) -> &'static str {
        "forged-redis"
    }
    fn title(&self) -> &'static str {
        "forged records in the cluster's Redis: bans of 0.0.0.0/0 and of every legitimate client, scores of 0, used-up windows"
    }
    fn sources(&self) -> u32 {
        0
    }
    fn budget(&self, quick: bool) -> Budget {
        budget(quick, 1, 1, 10)
    }
    fn skip(&self, ctx: &Ctx) -> Option<String> {
        match (&ctx.redis, &ctx.defenses.cluster_prefix) {
            (Some(_), Some(_)) => None,
            _ => Some("needs --redis URL, a Redis the drill may write to (cluster mode)".to_owned()),
        }
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let (Some(url), Some(prefix)) = (ctx.redis.clone(), ctx.defenses.cluster_prefix.clone()) else {
                bail!("not in cluster mode");
            };
            let mut windows = vec!["default".to_owned()];
            windows.extend(ctx.defenses.route.as_ref().map(|r| r.name.clone()));
            let forgery = Forgery {
                prefix,
                victims: ctx.legit.to_vec(),
                windows,
                now_ms: palisade_core::unix_now_ms(),
            };
            let before = unauthenticated(&ctx.admin.metrics().await?);
            let (f, u) = (forgery.clone(), url.clone());
            // The Redis is reached from the host's namespace (see relay.rs).
            let planted = tokio::task::spawn_blocking(move || in_host(move || f.plant(&u)))
                .await
                .context("planting panicked")??
                .context("writing the forged records to Redis")?;
            // The nodes read them while the population keeps asking.
            tokio::time::sleep(ctx.budget.seconds).await;
            let judged = judge(&ctx, &forgery, before).await;
            let removed =
                tokio::task::spawn_blocking(move || in_host(move || forgery.remove(&url, &planted)))
                    .await
                    .context("removing panicked")?
                    .and_then(|r| r.context("taking the forged records out of Redis"));
            let outcome = judged?;
            removed?;
            Ok(outcome)
        })
    }
}

/// What the node made of the planted records: it must have refused some
/// as unauthenticated and applied none of the bans.
async fn judge(ctx: &Ctx, forgery: &Forgery, before: u64) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        sent: (forgery.fields().len() + forgery.events().len()) as u64,
        ..Outcome::default()
    };
    let refused = unauthenticated(&ctx.admin.metrics().await?).saturating_sub(before);
    if refused == 0 {
        outcome
            .breaches
            .push("no forged record was refused as unauthenticated".to_owned());
    }
    outcome
        .notes
        .push(format!("{refused} forged records refused as unauthenticated"));
    match ctx.admin.get("/api/v1/bans").await {
        Ok(bans) => {
            if bans.contains("0.0.0.0/0") {
                outcome
                    .breaches
                    .push("the forged ban of 0.0.0.0/0 was applied".to_owned());
            }
            if let Some(v) = forgery.victims.iter().find(|v| bans.contains(&format!("\"{v}/"))) {
                outcome
                    .breaches
                    .push(format!("the forged ban of the legitimate client {v} was applied"));
            }
        }
        Err(e) => outcome.notes.push(format!("no ban list: {e:#}")),
    }
    Ok(outcome)
}
