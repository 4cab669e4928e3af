//! Resource queues: jobs that declare the same resource run one at a time, in submission
//! order; a job runs when it heads the queue of every resource it declares.

use crate::job::JobId;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct Scheduler {
    queues: Mutex<HashMap<String, VecDeque<JobId>>>,
    released: Notify,
}

impl Scheduler {
    /// Puts a job at the back of each of its resources' queues.
    pub(crate) fn enqueue(&self, job: JobId, resources: &[String]) {
        let mut q = self.queues.lock().expect("scheduler lock");
        for r in resources {
            q.entry(r.clone()).or_default().push_back(job);
        }
    }

    /// The resources, with the job holding each, that `job` still waits for.
    pub(crate) fn blockers(&self, job: JobId, resources: &[String]) -> Vec<(String, JobId)> {
        let q = self.queues.lock().expect("scheduler lock");
        resources
            .iter()
            .filter_map(|r| match q.get(r).and_then(|q| q.front()) {
                Some(head) if *head != job => Some((r.clone(), *head)),
                _ => None,
            })
            .collect()
    }

    /// Waits until `job` heads all its queues; returns the blockers seen each time they change.
    pub(crate) async fn wait_turn(
        &self,
        job: JobId,
        resources: &[String],
        mut on_wait: impl FnMut(&[(String, JobId)]),
    ) {
        let mut last: Vec<(String, JobId)> = Vec::new();
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let blockers = self.blockers(job, resources);
            if blockers.is_empty() {
                return;
            }
            if blockers != last {
                on_wait(&blockers);
                last = blockers;
            }
            notified.await;
        }
    }

    /// Takes a job out of every queue it is in and wakes the waiters.
    pub(crate) fn release(&self, job: JobId, resources: &[String]) {
        let mut q = self.queues.lock().expect("scheduler lock");
        for r in resources {
            if let Some(queue) = q.get_mut(r) {
                queue.retain(|j| *j != job);
                if queue.is_empty() {
                    q.remove(r);
                }
            }
        }
        drop(q);
        self.released.notify_waiters();
    }
}
