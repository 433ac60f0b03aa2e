//! `riskgate.v1.RuleAdmin`: what pack is serving, and reloading it. Served on
//! its own listener so it can stay off public interfaces, and guarded by a
//! bearer token when one is configured.

use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::pack::manifest::Mode;
use crate::pb;
use crate::pb::rule_admin_server::{RuleAdmin, RuleAdminServer};
use crate::reload::Reloader;

#[derive(Clone)]
pub struct AdminApi {
    engine: Engine,
    reloader: Reloader,
}

impl AdminApi {
    pub fn new(engine: Engine, reloader: Reloader) -> AdminApi {
        AdminApi { engine, reloader }
    }
}

#[tonic::async_trait]
impl RuleAdmin for AdminApi {
    async fn get_ruleset(
        &self,
        _: Request<pb::GetRulesetRequest>,
    ) -> Result<Response<pb::Ruleset>, Status> {
        let pack = self.engine.pack();
        let stats = self.reloader.stats();
        Ok(Response::new(pb::Ruleset {
            version: pack.version.to_string(),
            name: pack.name.clone(),
            path: pack.dir.display().to_string(),
            loaded_at_ms: pack.loaded_at_ms,
            rules: pack
                .rules
                .iter()
                .map(|r| pb::RuleInfo {
                    id: r.id.to_string(),
                    mode: match r.mode {
                        Mode::Enforce => "enforce",
                        Mode::Shadow => "shadow",
                    }
                    .to_string(),
                    soft: r.soft,
                    description: r.description.clone(),
                    hits: r.hits(),
                    errors: r.errors(),
                    file: r.file.clone(),
                })
                .collect(),
            reloads: stats.reloads,
            reload_failures: stats.failures,
            last_reload_error: stats.last_error,
            decision_log_dropped: self.engine.decision_log().map_or(0, |l| l.dropped()),
        }))
    }

    async fn reload_rules(
        &self,
        _: Request<pb::ReloadRulesRequest>,
    ) -> Result<Response<pb::ReloadRulesResponse>, Status> {
        let r = self.reloader.reload("admin").await;
        Ok(Response::new(pb::ReloadRulesResponse {
            ok: r.ok,
            version: r.version,
            previous_version: r.previous_version,
            errors: r.errors,
            unchanged: r.unchanged,
        }))
    }
}

/// Checks `authorization: Bearer TOKEN` on every admin call when a token is set.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<String>,
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("admin token is wrong")),
            None => Err(Status::unauthenticated(
                "admin calls need `authorization: Bearer <token>`",
            )),
        }
    }
}

/// Compares without an early exit, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin service, behind the token check.
pub fn service(
    api: AdminApi,
    token: Option<String>,
) -> tonic::service::interceptor::InterceptedService<RuleAdminServer<AdminApi>, BearerAuth> {
    RuleAdminServer::with_interceptor(api, BearerAuth { expected: token })
}
