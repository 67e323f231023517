//! Extractors that let a request in or refuse it before its body is read,
//! so that a refused request costs little and changes nothing.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderValue;
use uuid::Uuid;

use super::error::ApiError;
use super::json::AgentIdParam;
use crate::auth::{AgentAccess, AgentRoute, Credentials, JoinAccess, ListingAccess, Refusal};
use crate::registry::Registry;

/// Registration: the join token, when one is configured.
pub struct JoinAllowed(pub JoinAccess);

impl<S> FromRequestParts<S> for JoinAllowed
where
    S: Send + Sync,
    Arc<Credentials>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let credentials = Arc::<Credentials>::from_ref(state);
        Ok(JoinAllowed(credentials.check_join(
            parts.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
        )?))
    }
}

/// Which credentials an agent route takes, as a type.
pub trait AgentRouteKind {
    const ROUTE: AgentRoute;
}

/// Heartbeats: the agent's own secret.
pub struct SelfOnly;
impl AgentRouteKind for SelfOnly {
    const ROUTE: AgentRoute = AgentRoute::SelfOnly;
}

/// Update, drain, delete: the agent's own secret or the admin token.
pub struct SelfOrAdmin;
impl AgentRouteKind for SelfOrAdmin {
    const ROUTE: AgentRoute = AgentRoute::SelfOrAdmin;
}

/// The `:id` of an agent route whose caller proved it may act on that agent.
pub struct AuthorizedAgent<R>(pub Uuid, pub PhantomData<R>);

impl<S, R> FromRequestParts<S> for AuthorizedAgent<R>
where
    S: Send + Sync,
    R: AgentRouteKind,
    Arc<Credentials>: FromRef<S>,
    Arc<Registry>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let AgentIdParam(id) = AgentIdParam::from_request_parts(parts, state).await?;
        let credentials = Arc::<Credentials>::from_ref(state);
        match credentials.check_agent_route(
            parts.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
            R::ROUTE,
        )? {
            AgentAccess::Open | AgentAccess::Admin => {}
            AgentAccess::MustBeAgent(presented) => {
                Arc::<Registry>::from_ref(state).verify_agent_secret(id, &presented)?;
            }
        }
        Ok(AuthorizedAgent(id, PhantomData))
    }
}

/// Admits a listing (`GET /api/agents`, `/metrics`) when listings are open
/// or a reader's credential (admin token, API key) came with it.
pub struct ListingAllowed;

impl<S> FromRequestParts<S> for ListingAllowed
where
    S: Send + Sync,
    Arc<Credentials>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let credentials = Arc::<Credentials>::from_ref(state);
        match credentials
            .check_listing(parts.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes))?
        {
            ListingAccess::Allowed => Ok(ListingAllowed),
            ListingAccess::MustBeAgent(_) => Err(Refusal::Unauthenticated.into()),
        }
    }
}

/// Admits reading one agent's record: as a listing, or with that agent's
/// own secret (an agent reads its own in-flight count while it drains).
pub struct RecordReadable;

impl<S> FromRequestParts<S> for RecordReadable
where
    S: Send + Sync,
    Arc<Credentials>: FromRef<S>,
    Arc<Registry>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let credentials = Arc::<Credentials>::from_ref(state);
        match credentials
            .check_listing(parts.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes))?
        {
            ListingAccess::Allowed => Ok(RecordReadable),
            ListingAccess::MustBeAgent(presented) => {
                let AgentIdParam(id) = AgentIdParam::from_request_parts(parts, state).await?;
                Arc::<Registry>::from_ref(state)
                    .verify_agent_secret(id, &presented)
                    .map_err(|_| ApiError::from(Refusal::Unauthenticated))?;
                Ok(RecordReadable)
            }
        }
    }
}
