//! All cores: [`Cluster`] runs N event loops, one per thread, each with its own listener on
//! the same port (`SO_REUSEPORT`, so the kernel spreads new connections over them), its own
//! slab, timer wheel and share of the fd budget. What the loops share lives in a [`Ledger`]:
//! the descriptor accounting behind the fd audit, the per-address admission table (so per-IP
//! limits hold for the process, as nginx's shared zones do), and the snapshots from which any
//! loop renders metrics for all of them. Nothing in it is touched per message.

use crate::app::{ConnId, Handler, Message};
use crate::config::Config;
use crate::error::Error;
use crate::ledger::{check_room, plan_budget, raise_fd_limit, Budget, Ledger};
use crate::metrics::Stats;
use crate::server::Server;
use crate::server::{LoopHandle, QueueError};
use crate::sys;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// What a loop thread tells the starter once its listeners are bound.
struct Bound<H: Handler> {
    handle: LoopHandle<H>,
    bound: Vec<SocketAddr>,
    metrics: Option<SocketAddr>,
}

/// N event loops on one port, one per thread (see the module docs). Built by
/// [`Cluster::start`]; stopped by [`Cluster::shutdown`] (or by dropping it); waited for by
/// [`Cluster::join`].
pub struct Cluster<H: Handler> {
    handles: Vec<LoopHandle<H>>,
    threads: Vec<JoinHandle<()>>,
    done: mpsc::Receiver<Result<(), Error>>,
    addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    budget: Budget,
}

impl<H: Handler + 'static> Cluster<H> {
    /// Start [`Config::threads`] loops, each listening on every address in `listen` (port 0
    /// picks a free port, the same for all loops), and loop 0 also on `metrics` for metrics
    /// and health only. `make_handler(i)` builds loop `i`'s handler on its own thread, so a
    /// handler need not be `Send`. The soft descriptor limit is raised first (with
    /// [`Config::raise_fd_limit`]); then the budget, measured once for the process, is split
    /// between the loops, as is `max_connections`. Returns once every loop is serving, or the
    /// first error (no loop is left running).
    pub fn start<F>(
        config: Config,
        listen: &[SocketAddr],
        metrics: Option<SocketAddr>,
        make_handler: F,
    ) -> Result<Self, Error>
    where
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        config.validate()?;
        if config.raise_fd_limit {
            raise_fd_limit();
        }
        let loops = config.threads;
        // Refuse a limit too low for the loops before any opens a descriptor (a loop that
        // failed with EMFILE halfway would only say "Too many open files").
        if let Ok((soft, _)) = sys::nofile_limit() {
            let open = match sys::open_fds() {
                Ok(n) => n,
                // Not even the directory that lists them can be opened: every one is in use.
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => soft as usize,
                Err(_) => 0, // no /proc: only what the limit itself allows is checked
            };
            // The Redis bridge's sockets count as open already.
            let bridge = config.redis.as_ref().map_or(0, crate::broker::bridge_fds);
            check_room(
                soft,
                open + bridge,
                config.fd_headroom,
                loops,
                listen.len(),
                metrics.is_some(),
            )?;
        }
        // The certificate and key are read and checked once, and the configuration made from
        // them shared by every loop.
        let tls = crate::io::tls::setup(&config)?;
        let ledger = Arc::new(Ledger::new(loops, &config).with_tls(tls));
        let make_handler = Arc::new(make_handler);
        let (done_tx, done) = mpsc::channel();
        let (started_tx, started) = mpsc::channel::<()>();
        let mut cluster = Cluster {
            handles: Vec::new(),
            threads: Vec::new(),
            done,
            addrs: listen.to_vec(),
            metrics_addr: None,
            budget: Budget {
                fd_budget: 0,
                max_connections: 0,
                fd_limit: 0,
                open: 0,
                headroom: config.fd_headroom,
                loops,
                memory_budget: 0,
            },
        };
        let mut gates = Vec::new();
        for i in 0..loops {
            let (ready_tx, ready_rx) = mpsc::channel::<Result<Bound<H>, Error>>();
            let (gate_tx, gate_rx) = mpsc::channel::<Option<(usize, usize)>>();
            let config = config.clone();
            let ledger = ledger.clone();
            let make_handler = make_handler.clone();
            let done_tx = done_tx.clone();
            let started_tx = started_tx.clone();
            let addrs = cluster.addrs.clone();
            let metrics = if i == 0 { metrics } else { None };
            let spawned = std::thread::Builder::new()
                .name(format!("wsloop-{i}"))
                .spawn(move || {
                    // A loop that panics (with `catch_panics` off, say) reports it like an
                    // error, so that `join` shuts the others down instead of waiting forever.
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        run_loop(
                            config,
                            ledger,
                            i,
                            &addrs,
                            metrics,
                            &*make_handler,
                            ready_tx,
                            gate_rx,
                            started_tx,
                        )
                    }))
                    .unwrap_or(Err(Error::LoopFailed {
                        loop_index: i,
                        what: "panicked",
                    }));
                    let _ = done_tx.send(result);
                });
            let thread = match spawned {
                Ok(t) => t,
                Err(e) => {
                    cluster.abort(gates);
                    return Err(Error::Io(e));
                }
            };
            cluster.threads.push(thread);
            let ready = ready_rx.recv().unwrap_or_else(|_| {
                Err(Error::LoopFailed {
                    loop_index: i,
                    what: "ended while starting",
                })
            });
            match ready {
                Ok(r) => {
                    // The first loop fixed the ports (port 0 picks one); the others share them.
                    if i == 0 {
                        cluster.addrs = r.bound;
                        cluster.metrics_addr = r.metrics;
                    }
                    cluster.handles.push(r.handle);
                    gates.push(gate_tx);
                }
                Err(e) => {
                    cluster.abort(gates);
                    return Err(e);
                }
            }
        }
        // Every loop has its epoll, waker, listeners and spare open: measure once, split.
        let plan = (|| -> Result<_, Error> {
            let (soft, _) = sys::nofile_limit()?;
            let in_use = sys::open_fds()?;
            ledger.set_base(in_use);
            let (headroom, wanted) = (config.fd_headroom, config.max_connections);
            // The Redis bridge's sockets, not open yet, are kept out of the connections' budget.
            let fixed = in_use + ledger.bridge_reserve();
            let plan = plan_budget(soft, fixed, headroom, wanted, loops)?;
            Ok((plan, soft, in_use))
        })();
        let (plan, soft, in_use) = match plan {
            Ok(p) => p,
            Err(e) => {
                cluster.abort(gates);
                return Err(e);
            }
        };
        let b = &mut cluster.budget;
        (b.fd_limit, b.open) = (soft, in_use);
        b.memory_budget = ledger.memory_budget().0;
        for (fds, max) in &plan {
            b.fd_budget += fds;
            b.max_connections += max;
        }
        for (gate, share) in gates.iter().zip(plan) {
            let _ = gate.send(Some(share));
        }
        drop(started_tx);
        // Each loop says when it has its share (and has published its first snapshot).
        for _ in 0..loops {
            if started.recv().is_err() {
                break; // a loop ended; `join` reports why
            }
        }
        Ok(cluster)
    }

    /// How the descriptors were budgeted at start (log it: operators look for it).
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The addresses the loops listen on (ports chosen when 0 was asked for).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The metrics-only address loop 0 listens on, if one was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// One handle per loop, in loop order (a connection lives on one loop: send to it through
    /// that loop's handle).
    pub fn handles(&self) -> &[LoopHandle<H>] {
        &self.handles
    }

    /// The handle of the loop that serves connection `id`.
    pub fn handle_of(&self, id: ConnId) -> Option<&LoopHandle<H>> {
        self.handles.get(id.loop_index())
    }

    /// Start a graceful shutdown of every loop.
    pub fn shutdown(&self) {
        for h in &self.handles {
            // `Err(Closed)`: that loop has ended already.
            let _ = h.shutdown();
        }
    }

    /// Publish `msg` to every subscriber of `topic` on every loop; never waits. Queued on the
    /// first loop, which forwards it to the others: publications from one thread reach each
    /// subscriber in the order they were made. See [`LoopHandle::try_publish`] for the errors.
    pub fn try_publish(&self, topic: &[u8], msg: Message<'_>) -> Result<(), QueueError> {
        match self.handles.first() {
            Some(h) => h.try_publish(topic, msg),
            None => Err(QueueError::Closed),
        }
    }

    /// How many subscribers `topic` has, summed over the loops (each asked in turn, so the sum
    /// may mix moments); `None` if a loop has ended.
    pub fn num_subscribers(&self, topic: &[u8]) -> Option<usize> {
        self.handles.iter().map(|h| h.num_subscribers(topic)).sum()
    }

    /// Each loop's counters, in loop order (a loop that has ended is left out).
    pub fn stats(&self) -> Vec<Stats> {
        self.handles.iter().filter_map(|h| h.stats()).collect()
    }

    /// The metrics of all loops in Prometheus text format, as `GET /metrics` serves them
    /// (totals, and per-loop series labelled `loop`), or `None` once loop 0 has ended.
    pub fn metrics(&self) -> Option<String> {
        self.handles.first().and_then(|h| h.metrics())
    }

    /// Wait until every loop has ended. When one fails (or panics, with
    /// [`Config::catch_panics`] off), the others are shut down, and the first error is
    /// returned once all have ended.
    pub fn join(mut self) -> Result<(), Error> {
        let mut first = Ok(());
        for _ in 0..self.threads.len() {
            match self.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    log::error!("a loop failed: {e}; shutting the others down");
                    self.shutdown();
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
                Err(_) => break,
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join(); // a panic was caught in the thread and reported above
        }
        first
    }

    /// Starting failed: release the loops that wait at their gate, and wait for them all.
    fn abort(&mut self, gates: Vec<mpsc::Sender<Option<(usize, usize)>>>) {
        for g in gates {
            let _ = g.send(None);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<H: Handler> Drop for Cluster<H> {
    /// A cluster dropped without [`Cluster::join`] shuts its loops down and waits for them (up
    /// to their shutdown timeout), rather than leaving threads nobody can stop.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        for h in &self.handles {
            let _ = h.shutdown(); // `Err(Closed)`: ended already
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One loop's thread: build the server, bind, report ready, wait at the gate for its share of
/// the fd budget, run.
#[allow(clippy::too_many_arguments)]
fn run_loop<H: Handler + 'static>(
    config: Config,
    ledger: Arc<Ledger>,
    i: usize,
    addrs: &[SocketAddr],
    metrics: Option<SocketAddr>,
    make_handler: &(dyn Fn(usize) -> H + Send + Sync),
    ready: mpsc::Sender<Result<Bound<H>, Error>>,
    gate: mpsc::Receiver<Option<(usize, usize)>>,
    started: mpsc::Sender<()>,
) -> Result<(), Error> {
    let reuse = ledger.loops() > 1;
    let setup = (|| -> Result<(Server<H>, Bound<H>), Error> {
        let mut server = Server::for_loop(config, make_handler(i), ledger, i)?;
        let mut bound = Vec::new();
        for addr in addrs {
            bound.push(server.listen_with(*addr, reuse)?);
        }
        let metrics = match metrics {
            Some(addr) => Some(server.listen_metrics(addr)?),
            None => None,
        };
        let handle = server.handle();
        let ready = Bound {
            handle,
            bound,
            metrics,
        };
        Ok((server, ready))
    })();
    let mut server = match setup {
        Ok((server, bound)) => {
            let _ = ready.send(Ok(bound));
            server
        }
        Err(e) => {
            // Reported to `start`, which fails with it.
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    match gate.recv() {
        Ok(Some((budget, max))) => server.join_budget(budget, max),
        _ => return Ok(()), // starting failed elsewhere
    }
    let _ = started.send(());
    drop(started);
    server.run()
}
