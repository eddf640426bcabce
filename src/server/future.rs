use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{Response, response};
use http_body::Body;
use pin_project_lite::pin_project;

use super::{
    body::{Collect, ResponseBody},
    config::Shared,
    service::{ClaimGuard, Inner, Run, SendBody, Start},
};
use crate::store::BoxError;

pub(super) type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;
type BoxWork<B, E> = Pin<Box<dyn Detach<Output = Answer<B, E>> + Send>>;

pin_project! {
    /// The response future of [`IdempotencyService`](super::IdempotencyService).
    ///
    /// A request the service does not handle (another method, or no key) is the inner
    /// service's future, unboxed; a request it answers at once is ready; a keyed request is
    /// boxed. Dropped while its handler runs, a keyed request hands the rest of the run to a
    /// task of its own (unless [`detach`](super::IdempotencyServiceLayer::detach) is off).
    pub struct ResponseFuture<F, B: Body, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B: Body, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Keyed { future: Detached<B, E> },
    }
}

impl<F, B: Body, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn keyed(future: BoxWork<B, E>) -> Self {
        Self {
            kind: Kind::Keyed {
                future: Detached(Some(future)),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Answer<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Keyed { future } => future
                .0
                .as_mut()
                .expect("only taken on drop")
                .as_mut()
                .poll(cx),
        }
    }
}

impl<F, B: Body, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Keyed { .. } => "Keyed",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

/// A keyed request's future, which may outlive its caller.
pub(crate) trait Detach: Future {
    /// Called in place of a drop when the caller goes away: a handler that is running goes on
    /// in a task of its own; anything else is dropped.
    fn detach(self: Pin<Box<Self>>);
}

/// Hands a keyed request's future to [`Detach::detach`] when it is dropped.
struct Detached<B: Body, E>(Option<BoxWork<B, E>>);

impl<B: Body, E> Drop for Detached<B, E> {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            future.detach();
        }
    }
}

/// A boxed future, for the paths of a keyed request that wait: they are rare, and their
/// timers would weigh on every request.
pub(super) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a keyed request goes on once its body is read and its key looked up.
pub(super) enum Step<A, O> {
    /// With an answer: the handler does not run.
    Answered(O),
    /// Leading: the handler was called, and `A` is its run.
    Run(A),
    /// After a wait (for the store, or for the same request), with another step.
    Wait(BoxFuture<Step<A, O>>),
}

/// How a keyed request goes on once its handler answered.
pub(super) enum Respond<B: Body, E> {
    /// With this answer.
    Now(Answer<B, E>),
    /// Read the body (of a length known to fit) to store it.
    Keep(response::Parts, B, ClaimGuard),
    /// After a store's step, or first the rest of the response's body.
    Later(BoxLater<Answer<B, E>>),
}

impl<B: Body, E> Respond<B, E>
where
    Answer<B, E>: 'static,
{
    /// Goes on in `future`: a store's step, or first the rest of the response's body, while
    /// `reading` says the handler is still at work.
    pub(super) fn later(
        shared: Arc<Shared>,
        reading: Option<Arc<AtomicBool>>,
        future: impl Future<Output = Answer<B, E>> + Send + 'static,
    ) -> Self {
        Respond::Later(Box::pin(Later {
            future,
            shared,
            reading,
        }))
    }
}

/// What a keyed request does once its handler answered, when it cannot be done at once.
pub(super) type BoxLater<T> = Pin<Box<dyn Finishing<Output = T> + Send>>;

/// A future that finishes a keyed request, and can say what a caller who leaves it leaves.
pub(super) trait Finishing: Future {
    /// The service's settings and tasks.
    fn shared(&self) -> &Arc<Shared>;
    /// Whether the handler is still at work: the response's body is being read.
    fn reading(&self) -> bool;
}

pin_project! {
    struct Later<F> {
        #[pin]
        future: F,
        shared: Arc<Shared>,
        reading: Option<Arc<AtomicBool>>,
    }
}

impl<F: Future> Future for Later<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().future.poll(cx)
    }
}

impl<F: Future> Finishing for Later<F> {
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn reading(&self) -> bool {
        self.reading
            .as_ref()
            .is_some_and(|reading| reading.load(Ordering::Acquire))
    }
}

pin_project! {
    /// A keyed request, from reading its body to storing its response, in one allocation.
    ///
    /// The path most requests take (a store in this process, a key that is free or already
    /// done, a response of known length) is written out here, so that it allocates nothing
    /// more and its state stays small; waits and remote stores go through boxed `async` code.
    /// The handler runs in the caller's task. Only a caller that goes away while the handler
    /// runs or its response is stored costs a task: what is left moves into one (when
    /// `detach` is on), so a half-done operation is never cancelled.
    pub(crate) struct Work<S, ReqBody: Body, ResBody: Body, F, E> {
        #[pin]
        phase: Phase<S, ReqBody, ResBody, F, E>,
        detach: bool,
        // Set while the future is being polled: a drop that finds it set comes from a panic,
        // after which the future cannot be polled again.
        polling: bool,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<S, ReqBody: Body, ResBody: Body, F, E> {
        // Reading the request's body.
        Read { #[pin] body: Collect<ReqBody>, start: Option<Start<S>> },
        // Waiting for the store or for the same request.
        Wait { future: BoxFuture<Step<Run<F>, Answer<ResBody, E>>> },
        // The handler runs; the claim's lease is renewed once it has waited.
        Call { #[pin] call: F, claim: Option<ClaimGuard> },
        // Reading the response's body to store it; the lease is still renewed while it waits.
        Keep {
            #[pin] body: Collect<ResBody>,
            parts: Option<response::Parts>,
            claim: Option<ClaimGuard>,
        },
        // Storing the response in a remote store, or reading a body of no given length, or
        // anything rarer.
        Finish { future: BoxLater<Answer<ResBody, E>> },
        Done,
    }
}

/// What a phase of a keyed request ends in.
enum Next<P, O> {
    /// Another phase.
    Phase(P),
    /// The answer.
    Answer(O),
}

impl<S, ReqBody: Body, ResBody: Body, F, E> Work<S, ReqBody, ResBody, F, E> {
    /// Reads `body`, up to `limit` bytes, then goes on from `start`.
    pub(crate) fn new(start: Start<S>, body: ReqBody, limit: usize, detach: bool) -> Self {
        Self {
            phase: Phase::Read {
                body: Collect::new(body, limit),
                start: Some(start),
            },
            detach,
            polling: false,
        }
    }
}

impl<S, ReqBody, ResBody, F, E> Phase<S, ReqBody, ResBody, F, E>
where
    S: Inner<ReqBody, ResBody, Future = F, Error = E>,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: SendBody,
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    fn after(step: Step<Run<F>, Answer<ResBody, E>>) -> Next<Self, Answer<ResBody, E>> {
        match step {
            Step::Answered(answer) => Next::Answer(answer),
            Step::Wait(future) => Next::Phase(Phase::Wait { future }),
            Step::Run(Run { call, claim }) => Next::Phase(Phase::Call {
                call,
                claim: Some(claim),
            }),
        }
    }

    fn respond(respond: Respond<ResBody, E>) -> Next<Self, Answer<ResBody, E>> {
        match respond {
            Respond::Now(answer) => Next::Answer(answer),
            // The body gave its length, within the limit; one that runs past it is read no
            // further than the limit all the same.
            Respond::Keep(parts, body, claim) => Next::Phase(Phase::Keep {
                body: Collect::new(body, claim.max_stored_response()),
                parts: Some(parts),
                claim: Some(claim),
            }),
            Respond::Later(future) => Next::Phase(Phase::Finish { future }),
        }
    }
    /// Polls a keyed request through as many phases as are ready.
    fn advance(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer<ResBody, E>> {
        loop {
            let next = match self.as_mut().project() {
                PhaseProj::Read { body, start } => {
                    let buffered = ready!(body.poll(cx));
                    Phase::after(start.take().expect("read once").read(buffered))
                }
                PhaseProj::Wait { future } => Phase::after(ready!(future.as_mut().poll(cx))),
                PhaseProj::Call { call, claim } => match call.poll(cx) {
                    Poll::Ready(answered) => {
                        Phase::respond(claim.take().expect("called once").answered(answered))
                    }
                    Poll::Pending => return waiting(claim, cx),
                },
                PhaseProj::Keep { body, parts, claim } => match body.poll(cx) {
                    Poll::Ready(buffered) => {
                        let claim = claim.take().expect("kept once");
                        Phase::respond(claim.keep(parts.take().expect("kept once"), buffered))
                    }
                    // The body can take as long as the handler did.
                    Poll::Pending => return waiting(claim, cx),
                },
                PhaseProj::Finish { future } => Next::Answer(ready!(future.as_mut().poll(cx))),
                PhaseProj::Done => panic!("ResponseFuture polled after completion"),
            };
            match next {
                Next::Phase(next) => self.set(next),
                Next::Answer(answer) => {
                    self.set(Phase::Done);
                    return Poll::Ready(answer);
                }
            }
        }
    }
}

/// A run that waits, on its handler or on its response's body: its claim's lease is renewed.
fn waiting<T>(claim: &mut Option<ClaimGuard>, cx: &mut Context<'_>) -> Poll<T> {
    if let Some(claim) = claim {
        claim.keep_alive(cx);
    }
    Poll::Pending
}

impl<S, ReqBody, ResBody, F, E> Future for Work<S, ReqBody, ResBody, F, E>
where
    S: Inner<ReqBody, ResBody, Future = F, Error = E>,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: SendBody,
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Answer<ResBody, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        *this.polling = true;
        let polled = this.phase.as_mut().advance(cx);
        *this.polling = false;
        polled
    }
}

impl<S, ReqBody, ResBody, F, E> Detach for Work<S, ReqBody, ResBody, F, E>
where
    Self: Future + Send + 'static,
    ReqBody: Body,
    ResBody: Body,
{
    fn detach(self: Pin<Box<Self>>) {
        if !self.detach || self.polling {
            return;
        }
        // Whether the handler's work goes on: its call, or the response body it makes.
        let (shared, handler) = match &self.phase {
            Phase::Call {
                claim: Some(claim), ..
            }
            | Phase::Keep {
                claim: Some(claim), ..
            } => (claim.shared(), true),
            Phase::Finish { future } => (future.shared(), future.reading()),
            _ => return,
        };
        let shared = shared.clone();
        // Only so many handlers go on without their callers; past that, the run is cancelled
        // as it would be without `detach`, and its claim released. A store's step is short,
        // and bounded by the store timeout.
        let slot = if handler {
            let Some(slot) = shared.detached_slot() else {
                // Once a minute: a flood of callers that leave would flood the log.
                if shared.detached.cancelled.now() {
                    tracing::warn!(
                        max_detached = shared.config.max_detached,
                        "idempotency: callers went away, and as many runs as may go on without their callers already do; those runs are cancelled (said once a minute)"
                    );
                }
                return;
            };
            Some(slot)
        } else {
            None
        };
        tracing::debug!("idempotency: the caller went away; the handler finishes on its own");
        // Without a runtime the run is dropped, and its claim released (a remote store's
        // lapses with its lease).
        shared.spawn(async move {
            drop(self.await);
            drop(slot);
        });
    }
}
