//! A relayed stream under observation: its events' usage and finish are gathered, and the
//! request is recorded when the stream ends.

use std::sync::Arc;

use tokio::time::Instant;

use super::finish::{Observation, RequestFacts, Summary};
use crate::llm::StreamEvent;
use crate::proxy::relay::{StreamEnd, StreamWatch};
use crate::proxy::resume::Seam;
use crate::snapshot::Route;

/// A committed stream under observation: its events' usage and finish are gathered, and the
/// request is recorded when it ends, however it ends (the app going away included).
pub struct StreamObserver {
    observation: Option<Observation>,
    route: Arc<Route>,
    request: RequestFacts,
    summary: Summary,
}

impl StreamObserver {
    /// Observes the stream `summary` describes.
    pub fn new(observation: Observation, route: Arc<Route>, request: RequestFacts, summary: Summary) -> Self {
        StreamObserver { observation: Some(observation), route, request, summary }
    }

    fn end_with(&mut self, end: StreamEnd) {
        if let Some(observation) = self.observation.take() {
            observation.finish(&self.route, &self.request, &self.summary, 200, Instant::now(), Some(&end));
        }
    }
}

impl StreamWatch for StreamObserver {
    fn event(&mut self, event: &StreamEvent) {
        if let Some(api) = self.summary.api {
            self.summary.info.observe_event(api, event);
        }
    }

    fn end(&mut self, end: StreamEnd) {
        self.end_with(end);
    }

    fn resumed(&mut self, seam: &Seam) {
        self.summary.resumed(seam);
    }
}

impl Drop for StreamObserver {
    fn drop(&mut self) {
        self.end_with(StreamEnd::Cancelled);
    }
}
