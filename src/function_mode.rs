//! Function mode's broker pieces behind one small handle, so that the integration tests
//! (`tests/function_mode.rs`) drive them against a real nats-server: consumer names, the
//! idempotent create, the per-function counts, the listing and the hand-over between the
//! modes. Hidden from the docs and not a stable API: the worker itself calls
//! [`crate::broker`] directly.

use std::time::Duration;

use crate::broker::{Broker, FunctionSpec, QueueSpec};
use crate::{Config, Error};

pub use crate::broker::{FunctionBacklog, FunctionConsumer};

/// A connection to NATS with the queue's stream provisioned (found or created, never a
/// consumer), and the function-mode settings of a [`Config`].
pub struct FunctionBroker {
    broker: Broker,
    spec: FunctionSpec,
}

impl FunctionBroker {
    /// Connects once and finds (or creates) the queue's stream, as the worker does at start.
    pub fn connect(config: &Config) -> Result<FunctionBroker, Error> {
        let broker = Broker::connect_once(config.into(), None)?;
        let mut spec = FunctionSpec::from(config);
        let (stream, _warnings) = broker.provision_stream(&spec.queue)?;
        spec.queue.stream = stream.name;
        Ok(FunctionBroker { broker, spec })
    }

    /// The stream that holds the queue.
    pub fn stream(&self) -> &str {
        &self.spec.queue.stream
    }

    /// [`Broker::prepare_function_mode`]: the idle static consumers it removed.
    pub fn prepare(&self) -> Result<Vec<String>, Error> {
        Ok(self.broker.prepare_function_mode(&self.spec)?.removed)
    }

    /// [`Broker::ensure_function_consumer`]: the consumer's name.
    pub fn ensure(&self, function: Option<&str>) -> Result<String, Error> {
        Ok(self.broker.ensure_function_consumer(&self.spec, function)?)
    }

    /// [`Broker::pending_by_function`] on this queue.
    pub fn pending_by_function(&self) -> Result<FunctionBacklog, Error> {
        let q = &self.spec.queue;
        Ok(self.broker.pending_by_function(&q.stream, &q.subject)?)
    }

    /// [`Broker::function_consumers`] of this deployment.
    pub fn consumers(&self) -> Result<Vec<FunctionConsumer>, Error> {
        let q = &self.spec.queue;
        Ok(self
            .broker
            .function_consumers(&q.stream, &q.durable, &q.subject)?)
    }

    /// [`Broker::remove_consumer_if_idle`].
    pub fn remove_if_idle(&self, name: &str) -> Result<bool, Error> {
        Ok(self.broker.remove_consumer_if_idle(self.stream(), name)?)
    }

    /// Static mode's set-up ([`Broker::provision`]), for the hand-over back from function mode.
    pub fn provision_static(&self) -> Result<(), Error> {
        self.broker.provision(&self.spec.queue).map(|_| ())?;
        Ok(())
    }

    /// The ack wait the lease timer needs in function mode ([`FunctionSpec::lease_ack_wait`]).
    pub fn lease_ack_wait(&self) -> Duration {
        self.spec.lease_ack_wait()
    }

    /// The queue settings of `function`'s consumer ([`FunctionSpec::consumer_spec`]): its
    /// name, as a puller would be made with.
    pub fn consumer_durable(&self, function: Option<&str>) -> String {
        let spec: QueueSpec = self.spec.consumer_spec(function);
        spec.durable
    }
}

impl Drop for FunctionBroker {
    fn drop(&mut self) {
        self.broker.shutdown(Duration::from_secs(1));
    }
}

/// The name of the consumer of `function` (`None`: the plain subject) for `nats_durable`.
pub fn consumer_name(durable: &str, function: Option<&str>) -> String {
    crate::broker::consumer_name(durable, function)
}

/// Whether the gateway can put `name` in a subject of the queue (`name`, `name.namespace`).
pub fn routable_function(name: &str) -> bool {
    crate::broker::routable_function(name)
}
