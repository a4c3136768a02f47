//! Items handed from one thread to another in order, in chunks (the receiver is woken once a
//! chunk, not once an item), with an end marker: a sender that dies before it (a panic)
//! leaves the stream unfinished, never taken as complete.

use std::collections::VecDeque;

use tokio::sync::mpsc;

/// Items a chunk carries at most.
const CHUNK: usize = 64;

enum Chunk<T> {
    Items(Vec<T>),
    End,
}

pub struct Sender<T> {
    tx: mpsc::Sender<Chunk<T>>,
    chunk: Vec<T>,
}

pub struct Receiver<T> {
    rx: mpsc::Receiver<Chunk<T>>,
    ready: VecDeque<T>,
    ended: bool,
}

/// A stream that holds about `capacity` items at most.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel((capacity / CHUNK).max(1));
    let sender = Sender {
        tx,
        chunk: Vec::with_capacity(CHUNK),
    };
    let receiver = Receiver {
        rx,
        ready: VecDeque::new(),
        ended: false,
    };
    (sender, receiver)
}

impl<T> Sender<T> {
    /// Queues an item (blocking the thread while the receiver is full). A partial chunk goes
    /// when `more_ready` is false (the next item would be waited for) or when the receiver
    /// has nothing queued: a slow pipe's rows are not held up. `Err`: the receiver is gone.
    pub fn push(&mut self, item: T, more_ready: bool) -> Result<(), ()> {
        self.chunk.push(item);
        if self.chunk.len() >= CHUNK || !more_ready || self.tx.capacity() == self.tx.max_capacity()
        {
            let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
            return self.tx.blocking_send(Chunk::Items(full)).map_err(|_| ());
        }
        Ok(())
    }

    /// What is queued, then the end marker.
    pub fn end(mut self) {
        let rest = std::mem::take(&mut self.chunk);
        if !rest.is_empty() && self.tx.blocking_send(Chunk::Items(rest)).is_err() {
            return;
        }
        let _ = self.tx.blocking_send(Chunk::End);
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` when there are no more: at the end, or because the sender died
    /// first (then [`Receiver::ended`] is false).
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            if let Some(i) = self.ready.pop_front() {
                return Some(i);
            }
            let chunk = self.rx.recv().await;
            if !self.take(chunk?) {
                return None;
            }
        }
    }

    /// `recv`, for a thread outside the runtime.
    pub fn blocking_recv(&mut self) -> Option<T> {
        loop {
            if let Some(i) = self.ready.pop_front() {
                return Some(i);
            }
            let chunk = self.rx.blocking_recv();
            if !self.take(chunk?) {
                return None;
            }
        }
    }

    /// Whether an item can be had without waiting.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty() || !self.rx.is_empty()
    }

    /// The sender reached its end (it did not die first).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// A chunk received; false at the end marker.
    fn take(&mut self, chunk: Chunk<T>) -> bool {
        match chunk {
            Chunk::Items(items) => {
                self.ready.extend(items);
                true
            }
            Chunk::End => {
                self.ended = true;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_arrive_in_order_and_only_an_end_marker_ends_the_stream() {
        let (mut tx, mut rx) = channel(1_000);
        let t = std::thread::spawn(move || {
            for i in 0..200 {
                tx.push(i, true).unwrap();
            }
            tx.end();
        });
        let got: Vec<i32> = std::iter::from_fn(|| rx.blocking_recv()).collect();
        t.join().unwrap();
        assert_eq!(got, (0..200).collect::<Vec<_>>());
        assert!(rx.ended());

        // A sender dropped before its end (a thread that panicked): what it sent arrives,
        // and the stream is not taken as complete.
        let (mut tx, mut rx) = channel(1_000);
        tx.push(1, false).unwrap();
        tx.push(2, true).unwrap();
        drop(tx);
        assert_eq!(rx.blocking_recv(), Some(1));
        assert_eq!(rx.blocking_recv(), None);
        assert!(!rx.ended());
    }
}
