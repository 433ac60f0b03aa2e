//! The gRPC surface: the `riskgate.v1.RiskEngine` service, health and
//! reflection. Decoding and validation happen here, and so does the mapping
//! of engine errors to status codes (in one place: [`status`]).

pub mod admin;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::decision::{Action, Reason};
use crate::engine::{Engine, EngineError, Evaluated};
use crate::pb;
use crate::pb::risk_engine_server::{RiskEngine, RiskEngineServer};
use crate::state::Store;

/// The RiskEngine service over an [`Engine`].
#[derive(Clone)]
pub struct Api {
    engine: Engine,
}

impl Api {
    pub fn new(engine: Engine) -> Api {
        Api { engine }
    }
}

#[tonic::async_trait]
impl RiskEngine for Api {
    async fn evaluate(
        &self,
        request: Request<pb::EvaluateRequest>,
    ) -> Result<Response<pb::Decision>, Status> {
        let recharge = validate::recharge(request.into_inner(), crate::now_ms())?;
        let evaluation = self.engine.start(recharge);
        let evaluated = evaluation.finish().await.map_err(status)?;
        Ok(Response::new(decision_reply(evaluated)))
    }

    async fn record_event(
        &self,
        request: Request<pb::Event>,
    ) -> Result<Response<pb::RecordEventResponse>, Status> {
        let login = validate::login(request.into_inner(), crate::now_ms())?;
        let replayed = self.engine.record_login(login).await.map_err(status)?;
        Ok(Response::new(pb::RecordEventResponse { replayed }))
    }

    async fn report_outcome(
        &self,
        request: Request<pb::Outcome>,
    ) -> Result<Response<pb::ReportOutcomeResponse>, Status> {
        let outcome = validate::outcome(request.into_inner(), crate::now_ms())?;
        let replayed = self.engine.report_outcome(outcome).await.map_err(status)?;
        Ok(Response::new(pb::ReportOutcomeResponse { replayed }))
    }
}

/// The floor for benchmarks (`serve --baseline`): the same service and
/// messages, answering ALLOW with no validation, no rules and no state, so
/// anyone can measure what the engine costs over bare gRPC on their machine.
#[derive(Clone, Default)]
pub struct Baseline;

#[tonic::async_trait]
impl RiskEngine for Baseline {
    async fn evaluate(
        &self,
        request: Request<pb::EvaluateRequest>,
    ) -> Result<Response<pb::Decision>, Status> {
        Ok(Response::new(pb::Decision {
            request_id: request.into_inner().request_id,
            action: pb::Action::Allow.into(),
            ruleset_version: "baseline".to_string(),
            ..Default::default()
        }))
    }

    async fn record_event(
        &self,
        _: Request<pb::Event>,
    ) -> Result<Response<pb::RecordEventResponse>, Status> {
        Ok(Response::new(pb::RecordEventResponse::default()))
    }

    async fn report_outcome(
        &self,
        _: Request<pb::Outcome>,
    ) -> Result<Response<pb::ReportOutcomeResponse>, Status> {
        Ok(Response::new(pb::ReportOutcomeResponse::default()))
    }
}

/// Engine errors as gRPC statuses.
fn status(e: EngineError) -> Status {
    match e {
        EngineError::Conflict(_) | EngineError::EventConflict(_) => {
            Status::already_exists(e.to_string())
        }
        EngineError::UnknownRequest(_) => Status::not_found(e.to_string()),
        EngineError::UserMismatch { .. } => Status::invalid_argument(format!("user_id: {e}")),
        EngineError::State(_) => Status::unavailable(e.to_string()),
        EngineError::InFlight(_) => Status::aborted(e.to_string()),
        EngineError::Contradicts { .. } => Status::failed_precondition(format!("outcome: {e}")),
    }
}

fn action(a: Action) -> i32 {
    match a {
        Action::Allow => pb::Action::Allow,
        Action::Challenge => pb::Action::Challenge,
        Action::Block => pb::Action::Block,
    }
    .into()
}

fn reason(r: Reason) -> pb::Reason {
    pb::Reason {
        rule_id: String::from(&*r.rule_id),
        code: r.code,
        message: r.message,
        action: action(r.action),
        score: clamp(r.score),
    }
}

fn clamp(score: i64) -> i32 {
    score.clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// The reply for a decision. A decision nothing else holds (in memory,
/// every one: a record packs its own copy) is taken apart, its strings
/// moved into the reply; one still shared (with a Redis settle in flight)
/// is copied first.
pub fn decision_reply(e: Evaluated) -> pb::Decision {
    let d = Arc::try_unwrap(e.decision).unwrap_or_else(|kept| (*kept).clone());
    pb::Decision {
        request_id: d.request_id,
        action: action(d.action),
        challenge: d.challenge,
        score: clamp(d.score),
        reasons: d.reasons.into_iter().map(reason).collect(),
        shadow_reasons: d.shadow_reasons.into_iter().map(reason).collect(),
        // `String::from`, not `to_string`: no trip through `Display`.
        ruleset_version: String::from(&*d.ruleset_version),
        replayed: e.replayed,
    }
}

/// Serves RiskEngine, health and reflection on `listener` until `shutdown`
/// resolves; requests in flight finish first.
pub async fn serve(
    engine: Engine,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let store = engine.store().clone();
    serve_service(
        RiskEngineServer::new(Api::new(engine)),
        Some(store),
        listener,
        shutdown,
    )
    .await
}

/// Serves [`Baseline`] the same way (health and reflection included).
pub async fn serve_baseline(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_service(RiskEngineServer::new(Baseline), None, listener, shutdown).await
}

/// Server reflection, v1 and v1alpha: grpcurl 1.8.6 (the one on PyPI),
/// grpcui and Postman ask only for v1alpha.
fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    (
        builder()
            .build_v1()
            .expect("the embedded descriptor set is valid"),
        builder()
            .build_v1alpha()
            .expect("the embedded descriptor set is valid"),
    )
}

/// The health service name that reports whether state can be reached.
/// The RiskEngine service itself stays SERVING while state is down: it
/// still answers, as the pack's `on_state_unavailable` says.
pub const STATE_HEALTH: &str = "riskgate.v1.State";

async fn serve_service<S: RiskEngine>(
    service: RiskEngineServer<S>,
    state: Option<Store>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RiskEngineServer<S>>().await;
    let watch = state.map(|store| tokio::spawn(watch_state(store, health)));
    let (reflection_v1, reflection_v1alpha) = reflection();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Some(watch) = watch {
        watch.abort();
    }
    served
}

/// Keeps [`STATE_HEALTH`] current: checks shared state every second (which
/// also brings a dropped Redis connection back without waiting for traffic).
async fn watch_state(store: Store, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let up = match &store {
            Store::Memory(_) => true,
            Store::Redis(r) => r.ping(std::time::Duration::from_secs(1)).await.is_ok(),
        };
        if last != Some(up) {
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(STATE_HEALTH, status).await;
            last = Some(up);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Serves RuleAdmin (and reflection) on its own listener until `shutdown`.
pub async fn serve_admin(
    api: admin::AdminApi,
    token: Option<String>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (reflection_v1, reflection_v1alpha) = reflection();
    tonic::transport::Server::builder()
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin::service(api, token))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
