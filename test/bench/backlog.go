package main

// -mode backlog: how brokerd copes with a large backlog. The tool starts
// brokerd itself (-broker, a command line), so that it knows its PID, can
// kill -9 it and can time a restart from the exec to the first CONNECTED:
//
//  1. start brokerd (its data directory should be empty), time to CONNECTED;
//  2. reference: 1 producer and 1 consumer with -window on a fresh queue for
//     -ref-duration: the throughput of a queue that never backs up;
//  3. fill: -producers producers (window -window, no consumer) send -count
//     messages to the backlog queue as fast as brokerd receipts them; the
//     broker's memory is sampled every 250 ms, and read again -settle after
//     the last receipt;
//  4. kill -9 brokerd, start it again on the same data directory: time from
//     the exec to the first CONNECTED, then to a probe message's round trip
//     on another queue; memory at CONNECTED and -settle later;
//  5. drain: -consumers consumers (ack -ack, prefetch -prefetch) take the
//     whole backlog; drain rate = distinct messages / (first SUBSCRIBE to
//     last first-time delivery); every receipted message must arrive (lost),
//     duplicates are counted. The drain gives up after -drain without a new
//     message;
//  6. stop brokerd (SIGTERM, then SIGKILL after 10 s).
//
// Then the summary, the verdict on the targets (-target-rss, -target-restart,
// -target-ratio: drain rate / reference rate) and one JSON line. Exit status
// 0 when every phase ran clean and every target was met; 1 on loss, ERROR, a
// failed connection, an unreceipted SEND or a broker that did not come back;
// 3 when the run was clean but a target was missed; 2 for bad flags. Ctrl-C
// stops the current phase and skips the rest (brokerd is still stopped);
// a second one kills brokerd and exits.

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
)

type backlogConfig struct {
	broker        string
	brokerLog     string
	pidFile       string
	refDuration   time.Duration
	settle        time.Duration
	startTimeout  time.Duration
	fillTimeout   time.Duration
	progress      time.Duration
	targetRSS     int
	targetRestart time.Duration
	targetRatio   float64
}

func (b *backlogConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&b.broker, "broker", "", "backlog: brokerd command line (split on blanks), e.g. \"/tmp/x/brokerd --data-dir D --stomp-addr 127.0.0.1:PORT --admin-addr 127.0.0.1:PORT2\"; its STOMP address must be -addr")
	fs.StringVar(&b.brokerLog, "broker-log", "", "backlog: append brokerd's stdout and stderr to this file (default: discard)")
	fs.StringVar(&b.pidFile, "broker-pidfile", "", "backlog: write the running brokerd's PID to this file (for the caller's cleanup)")
	fs.DurationVar(&b.refDuration, "ref-duration", 10*time.Second, "backlog: length of the reference run (1 producer, 1 consumer, -window; 0 skips it)")
	fs.DurationVar(&b.settle, "settle", 2*time.Second, "backlog: wait before the settled memory readings after the fill and after the restart")
	fs.DurationVar(&b.startTimeout, "start-timeout", 120*time.Second, "backlog: how long brokerd may take from exec to CONNECTED")
	fs.DurationVar(&b.fillTimeout, "fill-timeout", time.Hour, "backlog: stop filling after this long (the run then fails)")
	fs.DurationVar(&b.progress, "progress", 10*time.Second, "backlog: progress line on stderr this often during the fill and the drain (0 = none)")
	fs.IntVar(&b.targetRSS, "target-rss", 256, "backlog: target for brokerd's VmRSS with the backlog pending, MiB")
	fs.DurationVar(&b.targetRestart, "target-restart", time.Second, "backlog: target for restart (exec) to CONNECTED")
	fs.Float64Var(&b.targetRatio, "target-ratio", 0.8, "backlog: target for drain rate / reference rate")
}

// backlogDefaults checks the backlog flags and applies the backlog mode's
// own defaults to the flags not given.
func (c *config) backlogDefaults(set map[string]bool) error {
	if !set["producers"] {
		c.producers = 4
	}
	if !set["consumers"] {
		c.consumers = 4
	}
	if !set["window"] {
		c.window = 64
	}
	if !set["drain"] {
		c.drain = 60 * time.Second
	}
	switch {
	case c.bl.broker == "":
		return errors.New("-mode backlog needs -broker (the brokerd command line)")
	case c.count <= 0:
		return errors.New("-mode backlog needs -count > 0")
	case c.consumers < 1:
		return errors.New("-mode backlog needs -consumers >= 1")
	case c.window < 1:
		return errors.New("-mode backlog needs -window >= 1 (receipts tell what must survive the kill)")
	case c.pid != 0:
		return errors.New("-mode backlog starts brokerd itself: no -pid")
	case c.bl.refDuration < 0 || c.bl.settle < 0 || c.bl.startTimeout <= 0 || c.bl.fillTimeout <= 0 || c.bl.progress < 0:
		return errors.New("-ref-duration, -settle, -progress must be >= 0, -start-timeout and -fill-timeout > 0")
	}
	return nil
}

// ---------------------------------------------------------------------------
// The broker process

type brokerProc struct {
	argv    []string
	logPath string
	pidFile string

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	started time.Time
}

func (b *brokerProc) start() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	cmd := exec.Command(b.argv[0], b.argv[1:]...)
	// Its own process group: a Ctrl-C on the terminal reaches the tool,
	// which stops brokerd itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if b.logPath != "" {
		f, err := os.OpenFile(b.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close() // the child has its own descriptor
		fmt.Fprintf(f, "=== bench: starting %s at %s\n", strings.Join(b.argv, " "), time.Now().UTC().Format(time.RFC3339Nano))
		cmd.Stdout, cmd.Stderr = f, f
	}
	b.started = time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting brokerd: %w", err)
	}
	b.cmd = cmd
	exited := make(chan struct{})
	b.exited = exited
	go func() {
		err := cmd.Wait()
		b.mu.Lock()
		b.waitErr = err
		b.mu.Unlock()
		close(exited)
	}()
	if b.pidFile != "" {
		_ = os.WriteFile(b.pidFile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	}
	return nil
}

func (b *brokerProc) pid() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil {
		return 0
	}
	return b.cmd.Process.Pid
}

func (b *brokerProc) running() bool {
	b.mu.Lock()
	ch := b.exited
	b.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return false
	default:
		return true
	}
}

// signal sends sig and waits up to grace for the exit.
func (b *brokerProc) signal(sig syscall.Signal, grace time.Duration) bool {
	b.mu.Lock()
	cmd, ch := b.cmd, b.exited
	b.mu.Unlock()
	if cmd == nil {
		return true
	}
	select {
	case <-ch:
		return true
	default:
	}
	_ = cmd.Process.Signal(sig)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-ch:
		if b.pidFile != "" {
			_ = os.Remove(b.pidFile)
		}
		return true
	case <-t.C:
		return false
	}
}

// kill9 kills brokerd with SIGKILL and waits for it.
func (b *brokerProc) kill9() error {
	if !b.signal(syscall.SIGKILL, 30*time.Second) {
		return errors.New("brokerd did not die within 30 s of SIGKILL")
	}
	return nil
}

// stop asks brokerd to stop, and kills it after grace.
func (b *brokerProc) stop(grace time.Duration) (clean bool) {
	if b.signal(syscall.SIGTERM, grace) {
		return true
	}
	fmt.Fprintf(os.Stderr, "bench: brokerd (pid %d) still running %s after SIGTERM: SIGKILL\n", b.pid(), grace)
	_ = b.kill9()
	return false
}

// waitConnected polls the STOMP address until a CONNECT is answered with
// CONNECTED, and returns the time since the exec.
func (b *brokerProc) waitConnected(cfg config, timeout time.Duration) (time.Duration, error) {
	deadline := b.started.Add(timeout)
	probe := newRun(cfg) // failures here are not the measured run's
	probe.cfg.timeout = min(cfg.timeout, 5*time.Second)
	var last error
	for time.Now().Before(deadline) {
		if !b.running() {
			b.mu.Lock()
			err := b.waitErr
			b.mu.Unlock()
			return 0, fmt.Errorf("brokerd exited before serving STOMP (%v); see -broker-log", err)
		}
		c, err := dial(probe, "probe", cfg.addr)
		if err == nil {
			d := time.Since(b.started)
			go c.loop(func(*frame.Frame) {})
			_ = c.disconnect(cfg.timeout)
			return d, nil
		}
		last = err
		time.Sleep(2 * time.Millisecond)
	}
	return 0, fmt.Errorf("no CONNECTED within %s of starting brokerd: %v", timeout, last)
}

// roundTrip subscribes to a fresh probe queue, sends one persistent
// message with a receipt and waits for its delivery; it returns the time
// since the exec at which the message arrived.
func (b *brokerProc) roundTrip(cfg config, timeout time.Duration) (time.Duration, error) {
	probe := newRun(cfg)
	probe.cfg.timeout = timeout
	c, err := dial(probe, "probe", cfg.addr)
	if err != nil {
		return 0, err
	}
	got := make(chan struct{})
	var once sync.Once
	go c.loop(func(f *frame.Frame) {
		if f.Command == frame.MESSAGE {
			_ = c.writeNow(frame.New(frame.ACK, frame.Id, f.Header.Get(frame.Ack)))
			once.Do(func() { close(got) })
		}
	})
	defer func() { _ = c.disconnect(cfg.timeout) }()
	dest := cfg.dest + "-probe"
	if err := c.request(frame.New(frame.SUBSCRIBE, frame.Id, "probe", frame.Destination, dest, frame.Ack, frame.AckClientIndividual), "probe-sub", timeout); err != nil {
		return 0, err
	}
	send := frame.New(frame.SEND, frame.Destination, dest, "persistent", "true")
	send.Body = []byte("probe")
	if err := c.request(send, "probe-send", timeout); err != nil {
		return 0, err
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-got:
		return time.Since(b.started), nil
	case <-c.done:
		return 0, errors.New("probe: connection ended before the MESSAGE")
	case <-t.C:
		return 0, fmt.Errorf("probe: no MESSAGE within %s", timeout)
	}
}

// ---------------------------------------------------------------------------
// The scenario

type backlogResult struct {
	Mode      string   `json:"mode"` // "backlog"
	Label     string   `json:"label"`
	Addr      string   `json:"addr"`
	Dest      string   `json:"dest"`
	BrokerCmd []string `json:"broker_cmd"`
	Count     int64    `json:"count"`
	Size      int      `json:"size"`
	Producers int      `json:"producers"` // fill
	Consumers int      `json:"consumers"` // drain
	Window    int      `json:"window"`    // fill and reference
	Ack       string   `json:"ack"`
	Prefetch  int      `json:"prefetch"`

	// Seconds from exec to CONNECTED, and to a probe's round trip, on the
	// empty data directory.
	ColdConnectedS float64 `json:"cold_connected_s"`
	ColdReadyS     float64 `json:"cold_ready_s"`
	IdleMem        memStat `json:"idle_mem"` // after the cold start

	Reference *result `json:"reference,omitempty"`
	RefRate   float64 `json:"ref_rate"` // reference: distinct messages received/s

	Fill     *result  `json:"fill,omitempty"`
	FillRate float64  `json:"fill_rate"` // receipted/s
	FillMem  memStats `json:"fill_mem"`  // during the fill
	// Memory right after the last receipt and -settle later.
	FilledMem        memStat      `json:"filled_mem"`
	FilledSettledMem memStat      `json:"filled_settled_mem"`
	FillStore        *storeCounts `json:"fill_store,omitempty"` // with -admin: log wraps during the fill

	// Restart after kill -9: exec to CONNECTED, exec to a probe's round
	// trip (another queue), memory at CONNECTED and -settle later.
	RestartConnectedS float64 `json:"restart_connected_s"`
	RestartReadyS     float64 `json:"restart_ready_s"`
	RestartMem        memStat `json:"restart_mem"`
	RestartSettledMem memStat `json:"restart_settled_mem"`

	Drain *result `json:"drain,omitempty"`
	// Drain rate: distinct messages / (first SUBSCRIBE to last first-time
	// delivery), over drain_s; first MESSAGE drain_first_s after the first
	// SUBSCRIBE.
	DrainRate   float64  `json:"drain_rate"`
	DrainS      float64  `json:"drain_s"`
	DrainFirstS float64  `json:"drain_first_s"`
	DrainMem    memStats `json:"drain_mem"`
	Ratio       float64  `json:"ratio"` // drain_rate / ref_rate

	Received    int64 `json:"received"` // distinct backlog messages drained
	Lost        int64 `json:"lost"`
	Duplicated  int64 `json:"duplicated"`
	Redelivered int64 `json:"redelivered"`
	Unreceipted int64 `json:"unreceipted"` // fill SENDs never receipted

	// Worst memory while the backlog was pending (fill, after it, after
	// the restart, drain), against -target-rss.
	BacklogPeakRSS  int64 `json:"backlog_peak_rss"`
	BacklogPeakAnon int64 `json:"backlog_peak_rss_anon"`

	Targets struct {
		RSSMiB    int     `json:"rss_mib"`
		RestartS  float64 `json:"restart_s"`
		Ratio     float64 `json:"ratio"`
		RSSOK     bool    `json:"rss_ok"`      // VmRSS
		RSSAnonOK bool    `json:"rss_anon_ok"` // RssAnon only (bbolt's mmap is RssFile)
		RestartOK bool    `json:"restart_ok"`
		RatioOK   bool    `json:"ratio_ok"`
	} `json:"targets"`
	TargetsMet  bool     `json:"targets_met"` // rss_ok (VmRSS), restart_ok, ratio_ok
	Interrupted bool     `json:"interrupted"`
	Errors      []string `json:"errors"`
	OK          bool     `json:"ok"` // every phase ran, nothing lost, no error
}

type backlog struct {
	cfg  config
	b    *brokerProc
	res  backlogResult
	cur  atomic.Pointer[run]
	intr atomic.Bool
	log  func(format string, a ...any)
}

func (bl *backlog) fail(err error) {
	bl.res.Errors = append(bl.res.Errors, err.Error())
	fmt.Fprintln(os.Stderr, "bench:", err)
}

func (bl *backlog) stopped() bool { return bl.intr.Load() }

func backlogMain(cfg config) int {
	bl := &backlog{cfg: cfg}
	bl.log = func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "bench: %s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
	}
	bl.b = &brokerProc{argv: strings.Fields(cfg.bl.broker), logPath: cfg.bl.brokerLog, pidFile: cfg.bl.pidFile}
	r := &bl.res
	*r = backlogResult{
		Mode: "backlog", Label: cfg.label, Addr: cfg.addr, Dest: cfg.dest, BrokerCmd: bl.b.argv,
		Count: cfg.count, Size: cfg.size, Producers: cfg.producers, Consumers: cfg.consumers,
		Window: cfg.window, Ack: cfg.ack, Prefetch: cfg.prefetch, Errors: []string{},
	}

	sig := make(chan os.Signal, 2)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "bench: interrupted: ending this phase, skipping the rest, stopping brokerd (again to kill it and exit)")
		bl.intr.Store(true)
		if cur := bl.cur.Load(); cur != nil {
			bl.interrupt(cur)
		}
		<-sig
		fmt.Fprintln(os.Stderr, "bench: interrupted again: killing brokerd")
		_ = bl.b.kill9()
		os.Exit(1)
	}()
	defer bl.b.stop(10 * time.Second)

	bl.scenario()

	if bl.b.running() {
		bl.log("stopping brokerd (pid %d)", bl.b.pid())
		if !bl.b.stop(10 * time.Second) {
			bl.fail(errors.New("brokerd did not stop within 10 s of SIGTERM"))
		}
	}
	return bl.report()
}

// interrupt ends run r early: producers stop and still wait (up to their
// -drain) for the receipts of what they sent; a consumers-only drain stops.
func (bl *backlog) interrupt(r *run) {
	r.stopOnce.Do(func() { close(r.stop) })
	if r.cfg.producers == 0 {
		r.abortOnce.Do(func() { close(r.abort) })
	}
}

// phase runs one load run (reference, fill or drain) with its memory
// sampler and checkpoint watch.
func (bl *backlog) phase(r *run, trackers []*tracker, idleDrain bool) (result, memStats, *storeCounts) {
	bl.cur.Store(r)
	defer bl.cur.Store(nil)
	if bl.stopped() { // interrupted between phases
		bl.interrupt(r)
	}
	mem := startMemSampler(bl.b.pid(), 250*time.Millisecond)
	var ck *storeWatch
	if bl.cfg.admin != "" {
		ck = newStoreWatch(bl.cfg.admin)
	}
	progress := make(chan struct{})
	var pwg sync.WaitGroup
	if bl.cfg.bl.progress > 0 {
		pwg.Go(func() {
			t := time.NewTicker(bl.cfg.bl.progress)
			defer t.Stop()
			var prev int64
			prevT := time.Now()
			for {
				select {
				case <-progress:
					return
				case now := <-t.C:
					var n int64
					what := "received"
					if r.cfg.consumers == 0 {
						what = "sent"
						n = r.totalSent.Load()
					} else {
						n = r.uniqueRecv.Load()
					}
					rate := float64(n-prev) / now.Sub(prevT).Seconds()
					prev, prevT = n, now
					m, _ := readMem(bl.b.pid())
					bl.log("%s: %d/%d %s, %.0f msg/s; brokerd %s", r.cfg.label, n, max(r.expected(), r.cfg.count), what, rate, m)
				}
			}
		})
	}
	sendEnd := time.Now()
	if err := r.setup(trackers); err != nil {
		r.teardown()
	} else {
		r.begin(ck)
		if r.cfg.producers > 0 {
			sendEnd = r.produce()
		}
		r.waitDrain(idleDrain)
		r.closeConsumers()
	}
	close(progress)
	pwg.Wait()
	res := r.compute(sendEnd)
	ms := mem.stop()
	var nck *storeCounts
	if ck != nil {
		nck = ck.stop()
		res.Store = nck
	}
	res.Broker = &ms
	r.errMu.Lock()
	for _, e := range r.errs {
		bl.res.Errors = append(bl.res.Errors, r.cfg.label+": "+e)
	}
	r.errMu.Unlock()
	return res, ms, nck
}

func (bl *backlog) scenario() {
	cfg, r, b := bl.cfg, &bl.res, bl.b

	// 1. Cold start.
	bl.log("starting %s", strings.Join(b.argv, " "))
	if err := b.start(); err != nil {
		bl.fail(err)
		return
	}
	d, err := b.waitConnected(cfg, cfg.bl.startTimeout)
	if err != nil {
		bl.fail(err)
		return
	}
	r.ColdConnectedS = d.Seconds()
	if d, err = b.roundTrip(cfg, cfg.bl.startTimeout); err != nil {
		bl.fail(fmt.Errorf("cold start: %w", err))
		return
	}
	r.ColdReadyS = d.Seconds()
	r.IdleMem, _ = readMem(b.pid())
	bl.log("brokerd pid %d: CONNECTED %.3fs after exec, probe round trip at %.3fs; %s", b.pid(), r.ColdConnectedS, r.ColdReadyS, r.IdleMem)

	// 2. Reference.
	if cfg.bl.refDuration > 0 && !bl.stopped() {
		rc := cfg
		rc.label, rc.dest = "reference", cfg.dest+"-ref"
		rc.producers, rc.consumers, rc.count, rc.duration = 1, 1, 0, cfg.bl.refDuration
		rc.drain = 10 * time.Second
		bl.log("reference: 1 producer, 1 consumer, window %d, %s on %s", rc.window, rc.duration, rc.dest)
		res, _, _ := bl.phase(newRun(rc), nil, false)
		r.Reference = &res
		r.RefRate = res.RecvRate
		bl.log("reference: %.1f msg/s received, %.1f msg/s receipted, lost %d", res.RecvRate, res.SendRate, res.Lost)
	}
	if bl.stopped() {
		return
	}

	// 3. Fill.
	fc := cfg
	fc.label, fc.consumers = "fill", 0
	fc.drain = max(cfg.timeout, 30*time.Second) // for the last receipts
	fill := newRun(fc)
	fillTimer := time.AfterFunc(cfg.bl.fillTimeout, func() {
		bl.log("fill: -fill-timeout %s reached, stopping the producers", cfg.bl.fillTimeout)
		fill.stopOnce.Do(func() { close(fill.stop) })
	})
	bl.log("fill: %d producers, window %d, %d messages of %d B on %s", fc.producers, fc.window, fc.count, fc.size, fc.dest)
	res, fm, nck := bl.phase(fill, nil, false)
	fillTimer.Stop()
	r.Fill, r.FillRate, r.FillMem, r.FillStore = &res, res.SendRate, fm, nck
	r.Unreceipted = res.Unreceipted
	r.FilledMem, _ = readMem(b.pid())
	bl.log("fill: %d receipted of %d sent in %.1fs, %.1f msg/s; brokerd now %s", res.Receipted, res.Sent, res.SendSecs, res.SendRate, r.FilledMem)
	if res.Sent < cfg.count {
		bl.fail(fmt.Errorf("fill: only %d of %d messages sent", res.Sent, cfg.count))
	}
	if res.Unreceipted > 0 {
		bl.fail(fmt.Errorf("fill: %d SENDs without RECEIPT", res.Unreceipted))
	}
	if bl.sleep(cfg.bl.settle) {
		return
	}
	r.FilledSettledMem, _ = readMem(b.pid())
	bl.log("fill: %s later: brokerd %s", cfg.bl.settle, r.FilledSettledMem)
	if !b.running() {
		bl.fail(errors.New("brokerd died during the fill; see -broker-log"))
		return
	}

	// 4. kill -9 and restart.
	bl.log("kill -9 brokerd (pid %d)", b.pid())
	if err := b.kill9(); err != nil {
		bl.fail(err)
		return
	}
	if err := b.start(); err != nil {
		bl.fail(err)
		return
	}
	d, err = b.waitConnected(cfg, cfg.bl.startTimeout)
	if err != nil {
		bl.fail(fmt.Errorf("restart: %w", err))
		return
	}
	r.RestartConnectedS = d.Seconds()
	r.RestartMem, _ = readMem(b.pid())
	if d, err = b.roundTrip(cfg, cfg.bl.startTimeout); err != nil {
		bl.fail(fmt.Errorf("restart: %w", err))
	} else {
		r.RestartReadyS = d.Seconds()
	}
	bl.log("restart: brokerd pid %d: CONNECTED %.3fs after exec, probe round trip at %.3fs; at CONNECTED %s", b.pid(), r.RestartConnectedS, r.RestartReadyS, r.RestartMem)
	if bl.sleep(cfg.bl.settle) {
		return
	}
	r.RestartSettledMem, _ = readMem(b.pid())
	bl.log("restart: %s later: brokerd %s", cfg.bl.settle, r.RestartSettledMem)

	// 5. Drain.
	if bl.stopped() {
		return
	}
	dc := cfg
	dc.label, dc.producers = "drain", 0
	drain := newRun(dc)
	drain.id, drain.src = fill.id, fill
	bl.log("drain: %d consumers, ack %s, prefetch %d", dc.consumers, dc.ack, dc.prefetch)
	dres, dm, _ := bl.phase(drain, fill.trackers, true)
	r.Drain, r.DrainMem = &dres, dm
	r.DrainRate, r.DrainS = dres.RecvRate, dres.RecvSecs
	if f := drain.firstRecv.Load(); f > 0 {
		r.DrainFirstS = time.Unix(0, f).Sub(drain.start).Seconds()
	}
	r.Received, r.Lost, r.Duplicated, r.Redelivered = dres.Received, dres.Lost, dres.Duplicated, dres.Redelivered
	if r.RefRate > 0 {
		r.Ratio = r.DrainRate / r.RefRate
	}
	bl.log("drain: %d received in %.1fs, %.1f msg/s (first after %.3fs), lost %d, duplicated %d", r.Received, r.DrainS, r.DrainRate, r.DrainFirstS, r.Lost, r.Duplicated)
	if !b.running() {
		bl.fail(errors.New("brokerd died during the drain; see -broker-log"))
	}
}

// sleep waits d; it reports whether the run was interrupted.
func (bl *backlog) sleep(d time.Duration) bool {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if bl.stopped() {
			return true
		}
		time.Sleep(min(50*time.Millisecond, time.Until(end)))
	}
	return bl.stopped()
}

func (bl *backlog) report() int {
	cfg, r := bl.cfg, &bl.res
	r.Interrupted = bl.stopped()
	// Worst memory while the backlog was pending.
	for _, m := range []memStat{r.FilledMem, r.FilledSettledMem, r.RestartMem, r.RestartSettledMem} {
		r.BacklogPeakRSS = max(r.BacklogPeakRSS, m.RSS)
		r.BacklogPeakAnon = max(r.BacklogPeakAnon, m.Anon)
	}
	for _, s := range []memStats{r.FillMem, r.DrainMem} {
		r.BacklogPeakRSS = max(r.BacklogPeakRSS, s.PeakRSS)
		r.BacklogPeakAnon = max(r.BacklogPeakAnon, s.PeakAnon)
	}
	t := &r.Targets
	t.RSSMiB, t.RestartS, t.Ratio = cfg.bl.targetRSS, cfg.bl.targetRestart.Seconds(), cfg.bl.targetRatio
	limit := int64(cfg.bl.targetRSS) << 20
	complete := r.Drain != nil
	t.RSSOK = complete && r.BacklogPeakRSS <= limit
	t.RSSAnonOK = complete && r.BacklogPeakAnon <= limit
	t.RestartOK = complete && r.RestartConnectedS > 0 && r.RestartConnectedS < t.RestartS
	t.RatioOK = complete && r.RefRate > 0 && r.Ratio >= t.Ratio
	r.TargetsMet = t.RSSOK && t.RestartOK && t.RatioOK
	r.OK = complete && !r.Interrupted && len(r.Errors) == 0 && r.Lost == 0 && r.Unreceipted == 0 &&
		r.Received >= cfg.count

	if !cfg.jsonOnly {
		bl.printSummary()
	}
	// The sub-results' own series stay in the JSON; their labels say which.
	line, _ := json.Marshal(r)
	fmt.Println(string(line))
	switch {
	case !r.OK:
		return 1
	case !r.TargetsMet:
		return 3
	}
	return 0
}

func (bl *backlog) printSummary() {
	cfg, r := bl.cfg, &bl.res
	w := os.Stdout
	title := cfg.addr
	if cfg.label != "" {
		title = cfg.label + " @ " + cfg.addr
	}
	fmt.Fprintf(w, "== backlog: %s  %s ==\n", title, cfg.dest)
	fmt.Fprintf(w, "params    count=%d size=%dB fill: producers=%d window=%d persistent=%t; drain: consumers=%d ack=%s prefetch=%d\n",
		cfg.count, cfg.size, cfg.producers, cfg.window, cfg.persistent, cfg.consumers, cfg.ack, cfg.prefetch)
	fmt.Fprintf(w, "broker    %s\n", strings.Join(r.BrokerCmd, " "))
	if r.ColdConnectedS > 0 {
		fmt.Fprintf(w, "cold      CONNECTED %.3f s after exec, probe round trip at %.3f s; idle %s\n", r.ColdConnectedS, r.ColdReadyS, r.IdleMem)
	}
	if ref := r.Reference; ref != nil {
		fmt.Fprintf(w, "reference 1 producer, 1 consumer, window %d, %.0f s: received %.1f msg/s, receipted %.1f msg/s, receipt p50 %.3f ms p99 %.3f ms, lost %d\n",
			ref.Window, ref.DurationS, ref.RecvRate, ref.SendRate, ref.RcptP50, ref.RcptP99, ref.Lost)
	}
	if f := r.Fill; f != nil {
		ck := ""
		if r.FillStore != nil {
			ck = "; store: " + r.FillStore.String()
		}
		fmt.Fprintf(w, "fill      %.1f msg/s (receipted %d of %d sent in %.1f s), receipt p50 %.3f ms p99 %.3f ms max %.3f ms%s\n",
			f.SendRate, f.Receipted, f.Sent, f.SendSecs, f.RcptP50, f.RcptP99, f.RcptMax, ck)
		fmt.Fprintf(w, "  memory  %-16s %s\n", "during:", &r.FillMem)
		memLine(w, "last receipt:", r.FilledMem)
		memLine(w, "+"+cfg.bl.settle.String()+":", r.FilledSettledMem)
		if f.Series != nil {
			printSeries(w, f.Series, true)
		}
	}
	if r.RestartConnectedS > 0 {
		fmt.Fprintf(w, "restart   after kill -9: CONNECTED %.3f s after exec, probe round trip at %.3f s\n", r.RestartConnectedS, r.RestartReadyS)
		fmt.Fprintf(w, "  memory  %-16s %s\n", "at CONNECTED:", r.RestartMem)
		memLine(w, "+"+cfg.bl.settle.String()+":", r.RestartSettledMem)
	}
	if d := r.Drain; d != nil {
		fmt.Fprintf(w, "drain     %.1f msg/s (%d distinct in %.1f s from the first SUBSCRIBE; first MESSAGE after %.3f s), message age at delivery p50 %.0f ms max %.0f ms\n",
			r.DrainRate, r.Received, r.DrainS, r.DrainFirstS, d.LatP50, d.LatMax)
		fmt.Fprintf(w, "  memory  %-16s %s\n", "during:", &r.DrainMem)
		fmt.Fprintf(w, "  counts  expected=%d received=%d lost=%d duplicated=%d redelivered=%d deliveries=%d\n",
			d.Receipted, d.Received, d.Lost, d.Duplicated, d.Redelivered, d.Deliveries)
	}
	if r.RefRate > 0 && r.Drain != nil {
		fmt.Fprintf(w, "ratio     drain / reference = %.1f / %.1f = %.3f\n", r.DrainRate, r.RefRate, r.Ratio)
	}
	if r.Drain == nil {
		fmt.Fprintln(w, "targets   not evaluated: the scenario did not reach the drain")
	} else {
		t := r.Targets
		verdict := func(ok bool) string {
			if ok {
				return "met"
			}
			return "MISSED"
		}
		fmt.Fprintf(w, "targets   VmRSS with the backlog pending <= %d MiB: peak %.1f MiB %s (RssAnon peak %.1f MiB %s)\n",
			t.RSSMiB, mib(r.BacklogPeakRSS), verdict(t.RSSOK), mib(r.BacklogPeakAnon), verdict(t.RSSAnonOK))
		fmt.Fprintf(w, "          restart to CONNECTED < %.3f s: %.3f s %s\n", t.RestartS, r.RestartConnectedS, verdict(t.RestartOK))
		fmt.Fprintf(w, "          drain >= %.2f x reference: %.3f %s\n", t.Ratio, r.Ratio, verdict(t.RatioOK))
	}
	switch {
	case r.OK:
		fmt.Fprintln(w, "result    OK")
	default:
		var why []string
		if r.Interrupted {
			why = append(why, "interrupted")
		}
		if r.Lost > 0 {
			why = append(why, fmt.Sprintf("%d lost", r.Lost))
		}
		if r.Unreceipted > 0 {
			why = append(why, fmt.Sprintf("%d unreceipted", r.Unreceipted))
		}
		if r.Drain != nil && r.Received < cfg.count {
			why = append(why, fmt.Sprintf("%d of %d drained", r.Received, cfg.count))
		}
		if len(r.Errors) > 0 {
			why = append(why, fmt.Sprintf("%d error(s), see stderr", len(r.Errors)))
		}
		if r.Drain == nil {
			why = append(why, "did not reach the drain")
		}
		fmt.Fprintf(w, "result    FAIL (%s)\n", strings.Join(why, ", "))
	}
}

// memLine prints one memory reading, if it was taken.
func memLine(w io.Writer, label string, m memStat) {
	if m.RSS > 0 {
		fmt.Fprintf(w, "          %-16s %s\n", label, m)
	}
}
