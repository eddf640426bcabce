use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use super::body::ResponseBody;

pub(super) type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;
type BoxFuture<B, E> = Pin<Box<dyn Detach<Output = Answer<B, E>> + Send>>;

pin_project! {
    /// The response future of [`IdempotencyService`](super::IdempotencyService).
    ///
    /// A request the service does not handle (another method, or no key) is the inner
    /// service's future, unboxed; a request it answers at once is ready; a keyed request is
    /// boxed.
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

    pub(crate) fn keyed(future: BoxFuture<B, E>) -> Self {
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
struct Detached<B: Body, E>(Option<BoxFuture<B, E>>);

impl<B: Body, E> Drop for Detached<B, E> {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            future.detach();
        }
    }
}

/// How a keyed request's preparation (reading the body, joining or claiming the key) ends.
pub(crate) enum Step<A, O> {
    /// With an answer: the handler does not run.
    Answered(O),
    /// Leading: run the handler with `A`.
    Run(A),
}

pin_project! {
    /// A keyed request: it prepares, then, when it leads, runs the handler.
    ///
    /// Both phases live in one allocation, and the handler runs in the caller's task. Only a
    /// caller that goes away while the handler runs costs a task: what is left of the run
    /// moves into one (when `detach` is on), so a half-done operation is never cancelled.
    pub(crate) struct Work<P, R, A> {
        #[pin]
        phase: Phase<P, R>,
        run: fn(A) -> R,
        detach: bool,
        // Set while the run is being polled: a drop that finds it set comes from a panic in the
        // run, which cannot be polled again.
        polling: bool,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<P, R> {
        Prepare { #[pin] future: P },
        Run { #[pin] future: R },
        Done,
    }
}

impl<P, R, A> Work<P, R, A> {
    /// Prepares with `prepare`, and runs with what `run` makes of its [`Step::Run`].
    pub(crate) fn new(prepare: P, run: fn(A) -> R, detach: bool) -> Self {
        Self {
            phase: Phase::Prepare { future: prepare },
            run,
            detach,
            polling: false,
        }
    }
}

impl<P, R, A, O> Future for Work<P, R, A>
where
    P: Future<Output = Step<A, O>>,
    R: Future<Output = O>,
{
    type Output = O;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let mut this = self.project();
        if let PhaseProj::Prepare { future } = this.phase.as_mut().project() {
            match ready!(future.poll(cx)) {
                Step::Answered(output) => {
                    this.phase.set(Phase::Done);
                    return Poll::Ready(output);
                }
                Step::Run(args) => {
                    let run = (this.run)(args);
                    this.phase.set(Phase::Run { future: run });
                }
            }
        }
        let PhaseProj::Run { future } = this.phase.as_mut().project() else {
            panic!("ResponseFuture polled after completion");
        };
        *this.polling = true;
        let polled = future.poll(cx);
        *this.polling = false;
        let output = ready!(polled);
        this.phase.set(Phase::Done);
        Poll::Ready(output)
    }
}

impl<P, R, A, O> Detach for Work<P, R, A>
where
    P: Future<Output = Step<A, O>>,
    R: Future<Output = O>,
    Self: Send + 'static,
{
    fn detach(self: Pin<Box<Self>>) {
        let running = matches!(self.phase, Phase::Run { .. }) && !self.polling;
        if !(running && self.detach) {
            return;
        }
        // Without a runtime the run is dropped, and its claim lapses with its lease.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            tracing::debug!("idempotency: the caller went away; the handler finishes on its own");
            runtime.spawn(async move {
                drop(self.await);
            });
        }
    }
}
