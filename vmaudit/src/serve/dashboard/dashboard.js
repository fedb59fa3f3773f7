// The vmaudit dashboard. It subscribes to /events first, then reads /api/state (tables, recent
// verdicts, totals, history), then applies the events numbered after the state: nothing is
// missed or applied twice. Events wait in a queue and are applied once per animation frame,
// within a budget, each touching only the rows and plot series it concerns; a plot is redrawn
// at most once per frame, and once a second as time moves on. The history follows the hub's
// rules (vmaudit/src/serve/history.rs): counts per second and fd counts as steps, over the
// last `window_s` seconds of the hub's clock. No framework.
'use strict';

const MAX_VERDICT_ROWS = 500;
// Events held while paused (or while the tab is hidden); past it, the state is read again.
const MAX_QUEUE = 100000;
// Per frame: time spent applying events, and rows re-rendered; the rest waits a frame.
const FRAME_BUDGET_MS = 6;
const FRAME_ROWS = 200;
// An fd event that only re-tags the fd with its claim: no fd event, not counted.
const TAG_OP = 'claim';
const STATUS_COLORS = { confirmed: '#2e7d32', violated: '#c62828', unconfirmed: '#b08900', unknown: '#6b7580' };
const CAUSE_COLORS = ['#c62828', '#ef6c00', '#6a1b9a', '#00838f', '#5d4037', '#ad1457', '#283593', '#9e9d24'];
const EVENTS_COLOR = '#1f6feb';
const PLOTS = ['verdicts', 'fd_events', 'lost', 'fds'];

let S = null; // the model: /api/state kept current by the events
let queue = []; // events received and not yet applied, each stamped with its arrival (rx)
let loading = false;
let stale = false; // events were dropped: read the state again
let paused = false;
let pausedAt = 0;
let waiting = { events: 0, verdicts: 0 }; // received while paused
let framePending = false;
let dirty = newDirty();
const F = { text: '', status: '' };
const dom = { vmRows: new Map(), procRows: new Map(), sections: new Map() };
// Frame timings (apply: events and DOM writes; frame: through style, layout and paint;
// latency: the oldest event's arrival to paint; parse: the events that arrived meanwhile,
// parsed on the same thread), for the benchmark and for anyone curious.
const perf = window.dashboard = { frames: [], load: null, painted: 0, waiters: [], parse_ms: 0 };
perf.waitSeq = seq => new Promise(resolve => {
  perf.waiters.push({ seq, resolve });
  settle();
});

function newDirty() {
  return { totals: false, vms: new Set(), procs: new Set(), sections: new Set(), fds: new Set(), verdicts: [], plots: new Set(), filter: false };
}

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === 'class') e.className = v; else e.setAttribute(k, String(v));
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? '')));
  return e;
}

// Sets what changed only: an unchanged text or attribute costs no style or layout.
function setText(node, v) { v = String(v); if (node.textContent !== v) node.textContent = v; }
function setData(node, k, v) { v = String(v); if (node.dataset[k] !== v) node.dataset[k] = v; }

const pad = n => String(n).padStart(2, '0');
function hms(ms) { const d = new Date(ms); return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`; }
function hm(ms) { const d = new Date(ms); return `${pad(d.getHours())}:${pad(d.getMinutes())}`; }
function clock(ms) { return `${hms(ms)}.${String(new Date(ms).getMilliseconds()).padStart(3, '0')}`; }

// ---- the history, by the hub's rules ----

function rateAdd(rate, t, i, n, width) {
  const last = rate[rate.length - 1];
  if (last && last[0] >= t) { last[1][i] += n; return; }
  const counts = new Array(width).fill(0);
  counts[i] = n;
  rate.push([t, counts]);
}

function stepSet(steps, t, n) {
  const last = steps[steps.length - 1];
  if (last && last[1] === n) return;
  if (last && last[0] >= t) {
    last[1] = n;
    if (steps.length >= 2 && steps[steps.length - 2][1] === n) steps.pop();
  } else steps.push([t, n]);
}

function subject(key) {
  let s = S.hist.subjects.get(key);
  if (!s) { s = { fds: [], events: [], verdicts: [] }; S.hist.subjects.set(key, s); }
  return s;
}

function pruneHistory(now) {
  const keep = t => t + S.hist.window > now;
  const cut = rate => { let i = 0; while (i < rate.length && !keep(rate[i][0])) i++; if (i) rate.splice(0, i); };
  cut(S.hist.verdicts); cut(S.hist.fdEvents); cut(S.hist.lost);
  for (const [key, s] of S.hist.subjects) {
    cut(s.events); cut(s.verdicts);
    while (s.fds.length >= 2 && !keep(s.fds[1][0])) s.fds.shift();
    const f = s.fds[0];
    if (!s.events.length && !s.verdicts.length && s.fds.length <= 1 && (!f || (f[1] === 0 && !keep(f[0])))) S.hist.subjects.delete(key);
  }
}

// ---- state and events ----

async function load() {
  loading = true;
  const t0 = performance.now();
  const r = await fetch('/api/state', { cache: 'no-store' });
  const st = await r.json();
  const fetched = performance.now();
  const h = st.history;
  S = {
    scope: st.scope,
    seq: st.seq,
    vms: new Map(st.vms.map(v => [v.key, v])),
    pidAny: new Map(), // every VM's emulator pid, running or stopped: its fd table is shown
    procs: new Map(st.processes.map(p => [p.pid, new Map(p.fds.map(f => [f.fd, f]))])),
    totals: st.totals,
    claims: st.claims,
    lost: st.lost,
    decisions: st.decisions,
    hist: {
      window: h.window_s, statuses: h.statuses, causes: h.causes,
      verdicts: h.verdicts, fdEvents: h.fd_events, lost: h.lost,
      subjects: new Map(Object.entries(h.subjects)),
    },
    offset: h.now * 1000 - Date.now(), // the hub's clock minus the page's
  };
  for (const vm of st.vms) if (vm.pid) S.pidAny.set(vm.pid, vm.key);
  queue = queue.filter(ev => ev.seq > S.seq);
  loading = false;
  stale = false;
  document.body.dataset.scope = S.scope;
  renderAll(st.verdicts.slice(-MAX_VERDICT_ROWS));
  const rendered = performance.now();
  setTimeout(() => {
    perf.load = { fetch_ms: fetched - t0, render_ms: rendered - fetched, painted_ms: performance.now() - fetched };
    perf.painted = Math.max(perf.painted, st.seq);
    settle();
  });
  schedule();
}

function apply(ev) {
  if (ev.seq <= S.seq) return;
  S.seq = ev.seq;
  switch (ev.type) {
    case 'vm': applyVm(ev); break;
    case 'fd': applyFd(ev); break;
    case 'verdict': applyVerdict(ev); break;
    case 'claim': S.claims += 1; dirty.totals = true; break;
    case 'gap':
      for (const [c, n] of Object.entries(ev.counted)) S.lost[c] = (S.lost[c] || 0) + n;
      if (Object.keys(ev.counted).length) {
        const last = S.hist.lost[S.hist.lost.length - 1];
        if (last && last[0] >= ev.t) for (const [c, n] of Object.entries(ev.counted)) last[1][c] = (last[1][c] || 0) + n;
        else S.hist.lost.push([ev.t, { ...ev.counted }]);
      }
      dirty.totals = true;
      dirty.plots.add('lost');
      break;
    case 'decision':
      S.decisions[ev.decision.allowed ? 'allowed' : 'denied'] += 1;
      dirty.totals = true;
      break;
  }
}

function procSize(pid) { const t = S.procs.get(pid); return t ? t.size : 0; }

function applyVm(ev) {
  const vm = ev.vm;
  const old = S.vms.get(vm.key);
  if (old && old.pid && old.pid !== vm.pid) {
    S.pidAny.delete(old.pid);
    dirty.sections.add(old.pid);
  }
  S.vms.set(vm.key, vm);
  if (vm.pid) {
    S.pidAny.set(vm.pid, vm.key);
    stepSet(subject(vm.key).fds, ev.t, vm.state === 'running' ? procSize(vm.pid) : 0);
    dirty.sections.add(vm.pid);
  }
  dirty.vms.add(vm.key);
  dirty.plots.add('fds');
}

function applyFd(ev) {
  if (ev.fd !== null && ev.fd !== undefined) {
    let table = S.procs.get(ev.pid);
    if (ev.row) {
      if (!table) { table = new Map(); S.procs.set(ev.pid, table); dirty.sections.add(ev.pid); }
      table.set(ev.fd, ev.row);
    } else if (table) {
      table.delete(ev.fd);
      if (ev.op === 'exit' && table.size === 0) { S.procs.delete(ev.pid); dirty.sections.add(ev.pid); }
    }
    dirty.fds.add(`${ev.pid}:${ev.fd}`);
    dirty.procs.add(ev.pid);
    const key = S.pidAny.get(ev.pid);
    if (key) dirty.vms.add(key);
  }
  if (ev.op === TAG_OP) return;
  rateAdd(S.hist.fdEvents, ev.t, 0, 1, 1);
  if (ev.subject) {
    const s = subject(ev.subject);
    rateAdd(s.events, ev.t, 0, 1, 1);
    stepSet(s.fds, ev.t, procSize(ev.pid));
  }
  dirty.plots.add('fd_events');
  dirty.plots.add('fds');
}

function applyVerdict(ev) {
  const v = ev.verdict;
  const i = S.hist.statuses.indexOf(v.status);
  S.totals[v.status] += 1;
  rateAdd(S.hist.verdicts, ev.t, i, 1, 4);
  if (v.vm) {
    rateAdd(subject(v.vm).verdicts, ev.t, i, 1, 4);
    const vm = S.vms.get(v.vm);
    if (vm) { vm.verdicts[v.status] += 1; dirty.vms.add(v.vm); }
  }
  dirty.verdicts.push(v);
  dirty.totals = true;
  dirty.plots.add('verdicts');
}

// ---- frames ----

function schedule() {
  if (!framePending) { framePending = true; requestAnimationFrame(frame); }
}

function frame() {
  framePending = false;
  if (S === null || loading) return;
  if (stale && !paused) { load().catch(fail); return; }
  const start = performance.now();
  let n = 0;
  let oldestRx = Infinity;
  if (!paused) {
    while (n < queue.length) {
      const ev = queue[n++];
      oldestRx = Math.min(oldestRx, ev.rx);
      apply(ev);
      if ((n & 31) === 0 && (performance.now() - start > FRAME_BUDGET_MS || dirty.fds.size + dirty.vms.size > FRAME_ROWS)) break;
    }
    queue = n === queue.length ? [] : queue.slice(n);
  }
  const plots = render();
  const applied = performance.now();
  const seq = S.seq;
  const parsed = perf.parse_ms;
  setTimeout(() => {
    if (n || plots) {
      const end = performance.now();
      perf.frames.push({
        seq, events: n, plots, apply_ms: applied - start, frame_ms: end - start, parse_ms: perf.parse_ms - parsed,
        latency_ms: n ? end - oldestRx : 0, first_rx: n ? oldestRx : start, end,
      });
      if (perf.frames.length > 1000) perf.frames.shift();
    }
    perf.painted = Math.max(perf.painted, seq);
    settle();
  });
  if (queue.length && !paused) schedule();
}

// Resolves the waiters whose event has been applied and painted, each with the timings of the
// frame that applied it.
function settle() {
  perf.waiters = perf.waiters.filter(w => {
    if (w.seq > perf.painted) return true;
    w.resolve(perf.frames.find(f => f.seq >= w.seq) || null);
    return false;
  });
}

// ---- rendering ----

// Long lists are tables of at most CHUNK rows each, in boxes that are laid out and painted
// alone (and not at all off screen): a changed row costs its chunk, not the whole list.
const CHUNK = 50;

function chunk() {
  const tbody = el('tbody');
  return { box: el('div', { class: 'chunk' }, el('table', {}, tbody)), tbody };
}

function appendRows(list, rows) {
  let last = list.lastElementChild?.querySelector('tbody');
  for (const tr of rows) {
    if (!last || last.rows.length >= CHUNK) { const c = chunk(); list.append(c.box); last = c.tbody; }
    last.append(tr);
  }
}

// `rows` newest first, put before the list's first row.
function prependRows(list, rows) {
  let first = list.firstElementChild?.querySelector('tbody');
  for (let i = rows.length - 1; i >= 0; i--) {
    if (!first || first.rows.length >= CHUNK) { const c = chunk(); list.prepend(c.box); first = c.tbody; }
    first.prepend(rows[i]);
  }
}

function removeRow(tr) {
  const box = tr.closest('.chunk');
  tr.remove();
  if (box && !box.querySelector('tr')) box.remove();
}

function listRows(list) { return list.querySelectorAll('tr'); }

// Everything, from the state just read; `verdicts` oldest first.
function renderAll(verdicts) {
  dom.vmRows.clear(); dom.procRows.clear(); dom.sections.clear();
  for (const id of ['vm-rows', 'proc-rows', 'verdict-rows']) $(id).replaceChildren();
  appendRows($('vm-rows'), [...S.vms.values()].map(vmRow));
  appendRows($('proc-rows'), [...S.procs.keys()].map(procRow));
  $('fdtables').replaceChildren(...shownPids().map(buildSection));
  appendRows($('verdict-rows'), verdicts.slice().reverse().map(verdictRow));
  verdictCount = verdicts.length;
  dirty = newDirty();
  dirty.totals = true;
  dirty.filter = true;
  render();
}

function render() {
  const d = dirty;
  dirty = newDirty();
  if (d.totals) renderTotals();
  for (const key of d.vms) renderVm(key);
  for (const pid of d.procs) renderProc(pid);
  for (const pid of d.sections) renderSection(pid);
  const headers = new Set();
  for (const k of d.fds) {
    const [pid, fd] = k.split(':').map(Number);
    if (renderFd(pid, fd)) headers.add(pid);
  }
  for (const pid of headers) sectionHeader(pid);
  if (d.verdicts.length) renderVerdicts(d.verdicts);
  if (d.filter) applyFilter();
  if (d.filter || d.vms.size) renderShown();
  let plots = 0;
  for (const p of (d.filter ? PLOTS : d.plots)) plots += drawPlot(p);
  renderBuffered();
  return plots;
}

function renderTotals() {
  for (const s of S.hist.statuses) setText(document.querySelector(`#totals .count[data-status="${s}"]`), S.totals[s]);
  setText($('claims'), S.claims);
  setText($('allowed'), S.decisions.allowed);
  setText($('denied'), S.decisions.denied);
  setText($('lost'), Object.values(S.lost).reduce((a, b) => a + b, 0));
}

function renderBuffered() {
  const b = $('buffered');
  if (b.hidden !== !paused) b.hidden = !paused;
  if (!paused) return;
  setData(b, 'events', waiting.events);
  setData(b, 'verdicts', waiting.verdicts);
  setText(b, `paused: ${waiting.events} events waiting (${waiting.verdicts} verdicts)${stale ? '; too many to hold: the state is read again on resume' : ''}`);
}

function verdictText(counts) {
  return S.hist.statuses.filter(s => counts[s]).map(s => `${counts[s]} ${s}`).join(', ');
}

function vmRow(vm) {
  const tr = el('tr', { class: 'vm', 'data-key': vm.key, 'data-name': vm.name, 'data-uuid': vm.uuid, 'data-pid': vm.pid, 'data-state': vm.state },
    el('td', { class: 'name' }, vm.name),
    el('td', { class: 'uuid mono' }, vm.uuid),
    el('td', { class: 'pid' }, vm.pid || '?'),
    el('td', { class: 'state' }, vm.state),
    el('td', { class: 'nfds' }, procSize(vm.pid)),
    el('td', { class: 'verdicts' }, verdictText(vm.verdicts)));
  tr.hidden = !vmPasses(vm);
  dom.vmRows.set(vm.key, tr);
  return tr;
}

function renderVm(key) {
  const vm = S.vms.get(key);
  const tr = dom.vmRows.get(key);
  if (!tr) appendRows($('vm-rows'), [vmRow(vm)]);
  else {
    setData(tr, 'pid', vm.pid);
    setData(tr, 'state', vm.state);
    const c = tr.cells;
    setText(c[2], vm.pid || '?');
    setText(c[3], vm.state);
    setText(c[4], procSize(vm.pid));
    setText(c[5], verdictText(vm.verdicts));
    if (tr.hidden !== !vmPasses(vm)) tr.hidden = !vmPasses(vm);
  }
  const sec = vm.pid && dom.sections.get(vm.pid);
  if (sec) {
    if (sec.el.hidden !== !pidPasses(vm.pid)) sec.el.hidden = !pidPasses(vm.pid);
    sectionHeader(vm.pid);
  }
}

function procRow(pid) {
  const tr = el('tr', { class: 'proc', 'data-pid': pid }, el('td', { class: 'pid' }, pid), el('td', { class: 'nfds' }, procSize(pid)));
  tr.hidden = !pidPasses(pid);
  dom.procRows.set(pid, tr);
  return tr;
}

function renderProc(pid) {
  if (S.scope !== 'processes') return;
  const old = dom.procRows.get(pid);
  if (!S.procs.has(pid)) { if (old) removeRow(old); dom.procRows.delete(pid); return; }
  const tr = procRow(pid);
  if (old) old.replaceWith(tr); else appendRows($('proc-rows'), [tr]);
}

// The pids whose fd table is shown: every VM's emulator, or every watched process.
function shownPids() { return S.scope === 'vms' ? [...S.pidAny.keys()] : [...S.procs.keys()]; }
function isShown(pid) { return S.scope === 'vms' ? S.pidAny.has(pid) : S.procs.has(pid); }

function buildSection(pid) {
  const tbody = el('tbody');
  const sec = { el: el('section', { class: 'fdtable', 'data-pid': pid }), h3: el('h3'), tbody, rows: new Map() };
  const fds = [...(S.procs.get(pid) || new Map()).values()].sort((a, b) => a.fd - b.fd);
  for (const f of fds) { const tr = fdRow(pid, f); sec.rows.set(f.fd, tr); tbody.append(tr); }
  sec.el.append(sec.h3, el('table', {},
    el('colgroup', {}, ...['c-fd', 'c-path', 'c-kind', 'c-rdev', 'c-cloexec', 'c-via', 'c-since', 'c-claim'].map(c => el('col', { class: c }))),
    el('thead', {}, el('tr', {}, ...['fd', 'path', 'kind', 'rdev', 'cloexec', 'via', 'since', 'claim'].map(h => el('th', {}, h)))),
    tbody));
  sec.el.hidden = !pidPasses(pid);
  dom.sections.set(pid, sec);
  sectionHeader(pid);
  return sec.el;
}

function sectionHeader(pid) {
  const sec = dom.sections.get(pid);
  if (!sec) return;
  const n = procSize(pid);
  if (S.scope === 'vms') {
    const vm = S.vms.get(S.pidAny.get(pid));
    if (!sec.h3.firstChild) sec.h3.append('', el('small'));
    setText(sec.h3.firstChild, `${vm.name} · emulator pid ${pid} · ${n} fds `);
    setText(sec.h3.lastChild, vm.state);
  } else setText(sec.h3, `pid ${pid} · ${n} fds`);
}

function renderSection(pid) {
  const sec = dom.sections.get(pid);
  if (isShown(pid) && !sec) $('fdtables').append(buildSection(pid));
  else if (!isShown(pid) && sec) { sec.el.remove(); dom.sections.delete(pid); }
  else if (sec) { sec.el.hidden = !pidPasses(pid); sectionHeader(pid); }
}

function fdRow(pid, f) {
  const c = f.claim;
  return el('tr', {
    class: c ? 'fd claimed' : 'fd', 'data-pid': pid, 'data-fd': f.fd,
    'data-claim-id': c && c.id, 'data-claim-kind': c && c.kind, 'data-claim-status': c && c.status,
  },
    el('td', { class: 'fdnum' }, f.fd),
    el('td', { class: 'path' }, f.iface ? `${f.path} (${f.iface})` : f.path),
    el('td', { class: 'kind' }, f.kind || ''),
    el('td', { class: 'rdev' }, f.rdev || ''),
    el('td', { class: 'cloexec' }, f.cloexec ? 'yes' : 'no'),
    el('td', { class: 'via' }, f.via),
    el('td', { class: 'since' }, f.since_unix_ns ? clock(f.since_unix_ns / 1e6) : 'before watch'),
    el('td', { class: 'claim' }, c ? `#${c.id} ${c.kind}${c.mac ? ' ' + c.mac : ''}${c.status ? ' (' + c.status + ')' : ''}` : ''));
}

// Puts fd `fd` of `pid` as the model has it; returns whether its section is on the page.
function renderFd(pid, fd) {
  const sec = dom.sections.get(pid);
  if (!sec) return false;
  const f = S.procs.get(pid)?.get(fd);
  const old = sec.rows.get(fd);
  if (!f) {
    if (old) { old.remove(); sec.rows.delete(fd); }
    return true;
  }
  const tr = fdRow(pid, f);
  if (old) old.replaceWith(tr);
  else {
    let next = null;
    for (const [n, r] of sec.rows) if (n > fd && (next === null || n < Number(next.dataset.fd))) next = r;
    sec.tbody.insertBefore(tr, next);
  }
  sec.rows.set(fd, tr);
  return true;
}

function verdictRow(v) {
  const ev = v.evidence.map(e => [`pid ${e.pid}`, e.fd !== undefined ? `fd ${e.fd}` : null, e.what, e.path, e.rdev]
    .filter(x => x !== null && x !== undefined).join(' ')).join('; ');
  const tr = el('tr', {
    class: `verdict ${v.status}`, 'data-status': v.status, 'data-claim-id': v.claim.id, 'data-claim-kind': v.claim.kind, 'data-vm': v.vm,
  },
    el('td', { class: 'ts mono', title: v.ts }, clock(Date.parse(v.ts))),
    el('td', { class: 'status' }, v.status),
    el('td', { class: 'claim' }, `#${v.claim.id} ${v.claim.kind}${v.claim.mac ? ' ' + v.claim.mac : ''}`),
    el('td', { class: 'reason' }, v.reason),
    el('td', { class: 'evidence' }, ev));
  tr.verdict = v;
  tr.hidden = !verdictPasses(v);
  return tr;
}

let verdictCount = 0; // rows in #verdict-rows

function renderVerdicts(vs) {
  const list = $('verdict-rows');
  prependRows(list, vs.slice().reverse().map(verdictRow));
  verdictCount += vs.length;
  for (; verdictCount > MAX_VERDICT_ROWS; verdictCount--) {
    const last = list.lastElementChild;
    last.querySelector('tbody').lastElementChild.remove();
    if (!last.querySelector('tr')) last.remove();
  }
}

// ---- filters ----

function textMatch(...fields) { return !F.text || fields.some(f => String(f ?? '').toLowerCase().includes(F.text)); }
function vmPasses(vm) { return textMatch(vm.name, vm.uuid, vm.pid) && (!F.status || vm.verdicts[F.status] > 0); }
function pidPasses(pid) {
  if (S.scope === 'processes') return textMatch(pid);
  const vm = S.vms.get(S.pidAny.get(pid));
  return vm ? vmPasses(vm) : false;
}
function subjectPasses(key) {
  if (S.scope === 'processes') return textMatch(key);
  const vm = S.vms.get(key);
  return vm ? vmPasses(vm) : !F.text && !F.status;
}
function verdictPasses(v) {
  if (F.status && v.status !== F.status) return false;
  if (!F.text) return true;
  const vm = v.vm && S.vms.get(v.vm);
  return vm ? textMatch(vm.name, vm.uuid, vm.pid) : false;
}
function filtering() { return F.text !== '' || F.status !== ''; }

function applyFilter() {
  for (const [key, tr] of dom.vmRows) tr.hidden = !vmPasses(S.vms.get(key));
  for (const [pid, tr] of dom.procRows) tr.hidden = !pidPasses(pid);
  for (const [pid, sec] of dom.sections) sec.el.hidden = !pidPasses(pid);
  for (const tr of listRows($('verdict-rows'))) tr.hidden = !verdictPasses(tr.verdict);
}

function renderShown() {
  if (!filtering()) { setText($('shown'), ''); return; }
  const all = S.scope === 'vms' ? [...S.vms.values()] : [...S.procs.keys()];
  const shown = all.filter(x => (S.scope === 'vms' ? vmPasses(x) : pidPasses(x))).length;
  setText($('shown'), `showing ${shown} of ${all.length} ${S.scope === 'vms' ? 'VMs' : 'processes'}`);
}

// ---- plots ----

function viewNow() { return Math.floor(((paused ? pausedAt : Date.now()) + S.offset) / 1000); }

// Adds count `i` of `rate` into `out` (one slot per second from t0).
function dense(rate, i, t0, out) {
  for (const [t, c] of rate) if (t >= t0 && t - t0 < out.length) out[t - t0] += c[i];
  return out;
}

function subjectsShown() { return [...S.hist.subjects].filter(([key]) => subjectPasses(key)); }

// Canvas sizes, kept by a ResizeObserver: a frame reads no layout after writing the DOM.
const canvasSize = new Map();
const resized = new ResizeObserver(entries => {
  for (const e of entries) canvasSize.set(e.target, { w: e.contentRect.width, h: e.contentRect.height });
  if (S) { for (const name of PLOTS) dirty.plots.add(name); schedule(); }
});
for (const c of document.querySelectorAll('figure.plot canvas')) resized.observe(c);

// Returns 1 when the plot was drawn (it is on the page).
function drawPlot(name) {
  const fig = $(`plot-${name}`);
  if (name === 'verdicts' && S.scope !== 'vms') return 0;
  if (!canvasSize.get(fig.querySelector('canvas'))?.w) return 0;
  const t1 = viewNow();
  const t0 = t1 - S.hist.window + 1;
  const len = t1 - t0 + 1;
  const zeros = () => new Float64Array(len);
  const bySubject = filtering();
  let series = [];
  if (name === 'verdicts') {
    S.hist.statuses.forEach((status, i) => {
      if (F.status && status !== F.status) return;
      const v = zeros();
      if (bySubject) for (const [, s] of subjectsShown()) dense(s.verdicts, i, t0, v); else dense(S.hist.verdicts, i, t0, v);
      series.push({ name: status, color: STATUS_COLORS[status], values: v });
    });
  } else if (name === 'fd_events') {
    const v = zeros();
    if (bySubject) for (const [, s] of subjectsShown()) dense(s.events, 0, t0, v); else dense(S.hist.fdEvents, 0, t0, v);
    series.push({ name: 'fd events', color: EVENTS_COLOR, values: v });
  } else if (name === 'lost') {
    const causes = [...S.hist.causes];
    for (const [, c] of S.hist.lost) for (const k of Object.keys(c)) if (!causes.includes(k)) causes.push(k);
    series = causes.map((cause, i) => {
      const v = zeros();
      for (const [t, c] of S.hist.lost) if (t >= t0 && t <= t1 && c[cause]) v[t - t0] += c[cause];
      return { name: cause, color: CAUSE_COLORS[i % CAUSE_COLORS.length], values: v };
    });
  } else { drawSteps(fig, t0, t1); return 1; }
  const ymax = Math.max(1, ...series.map(s => s.values.reduce((a, b) => Math.max(a, b), 0)));
  const { g, x, y } = axes(fig, t0, t1, ymax);
  g.lineWidth = 1.5;
  for (const s of series) {
    if (!s.values.some(v => v > 0)) continue;
    g.strokeStyle = s.color;
    g.beginPath();
    s.values.forEach((v, i) => (i ? g.lineTo(x(t0 + i), y(v)) : g.moveTo(x(t0), y(v))));
    g.stroke();
  }
  legend(fig, series.map(s => ({ name: s.name, color: s.color, sum: s.values.reduce((a, b) => a + b, 0) })));
  return 1;
}

function subjectName(key) {
  if (S.scope === 'processes') return `pid ${key}`;
  const vm = S.vms.get(key);
  return vm ? vm.name : key;
}

const hues = new Map();
function hue(key) {
  let c = hues.get(key);
  if (!c) {
    let h = 0;
    for (const ch of key) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    c = `hsl(${h % 360}, 65%, 38%)`;
    hues.set(key, c);
  }
  return c;
}

// Legend entries named one by one, at most; past them the lines share one colour and one path.
const NAMED_LINES = 10;
const MANY_COLOR = 'rgba(31, 111, 235, 0.5)';

// fd counts: one step line per subject shown.
function drawSteps(fig, t0, t1) {
  const lines = subjectsShown().filter(([, s]) => s.fds.length);
  let ymax = 1;
  for (const [, s] of lines) for (const [t, n] of s.fds) if (t <= t1 && n > ymax) ymax = n;
  const { g, x, y } = axes(fig, t0, t1, ymax);
  g.lineWidth = 1.5;
  const named = lines.length <= NAMED_LINES;
  if (!named) { g.strokeStyle = MANY_COLOR; g.beginPath(); }
  const items = [];
  let total = 0;
  for (const [key, s] of lines) {
    let i = 0;
    while (i + 1 < s.fds.length && s.fds[i + 1][0] <= t0) i++;
    let v = s.fds[i][1];
    if (named) { g.strokeStyle = hue(key); g.beginPath(); }
    g.moveTo(x(Math.max(t0, s.fds[i][0])), y(v));
    for (i++; i < s.fds.length && s.fds[i][0] <= t1; i++) {
      g.lineTo(x(s.fds[i][0]), y(v));
      v = s.fds[i][1];
      g.lineTo(x(s.fds[i][0]), y(v));
    }
    g.lineTo(x(t1), y(v));
    if (named) { g.stroke(); items.push({ name: subjectName(key), color: hue(key), now: v }); }
    total += v;
  }
  if (!named) g.stroke();
  fig.dataset.lines = lines.length;
  fig.dataset.now = total;
  const box = fig.querySelector('.legend');
  if (named) {
    box.replaceChildren(...items.map(it => el('span', { class: 'series', 'data-name': it.name, 'data-now': it.now },
      el('i', { style: `background:${it.color}` }), `${it.name}: ${it.now}`)));
  } else box.replaceChildren(`${lines.length} ${S.scope === 'vms' ? 'VMs' : 'processes'}, ${total} fds now (filter to name them)`);
}

// A count in at most four characters: 950, 9500, 12k, 394k, 1.2M.
function compact(n) {
  if (n < 10000) return String(n);
  if (n < 1e6) return `${Math.round(n / 1000)}k`;
  return `${(n / 1e6).toFixed(n < 1e7 ? 1 : 0)}M`;
}

// Clears the canvas and draws the frame: wall-clock time below, 0 and the top count left.
function axes(fig, t0, t1, ymax) {
  const c = fig.querySelector('canvas');
  const dpr = window.devicePixelRatio || 1;
  const { w, h } = canvasSize.get(c);
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const L = 34, R = 6, T = 6, B = 16;
  const x = t => L + ((t - t0) / Math.max(1, t1 - t0)) * (w - L - R);
  const y = v => h - B - (v / ymax) * (h - T - B);
  g.font = '10px "DejaVu Sans", sans-serif';
  g.fillStyle = '#5b6570';
  g.strokeStyle = '#e1e4e8';
  g.lineWidth = 1;
  g.textAlign = 'center';
  g.textBaseline = 'top';
  for (let t = Math.ceil(t0 / 120) * 120; t <= t1; t += 120) {
    g.beginPath(); g.moveTo(x(t), T); g.lineTo(x(t), h - B); g.stroke();
    // A label that would not fit at either end is left out.
    if (x(t) > L + 15 && x(t) < w - 15) g.fillText(hm(t * 1000), x(t), h - B + 3);
  }
  g.textAlign = 'right';
  g.textBaseline = 'middle';
  g.fillText(compact(ymax), L - 4, y(ymax));
  g.fillText('0', L - 4, y(0));
  g.strokeStyle = '#8a939c';
  g.beginPath(); g.moveTo(L, y(0)); g.lineTo(w - R, y(0)); g.stroke();
  fig.dataset.t0 = t0;
  fig.dataset.t1 = t1;
  fig.querySelector('.range').textContent = `${hms(t0 * 1000)} – ${hms(t1 * 1000)}`;
  return { g, x, y };
}

function legend(fig, items) {
  fig.querySelector('.legend').replaceChildren(...items.map(it => el('span', { class: 'series', 'data-name': it.name, 'data-sum': it.sum },
    el('i', { style: `background:${it.color}` }), `${it.name}: ${it.sum}`)));
}

// ---- controls and the event stream ----

function fail(e) { $('conn').textContent = `state: ${e}`; loading = false; }

function setPaused(p) {
  paused = p;
  if (p) { pausedAt = Date.now(); waiting = { events: 0, verdicts: 0 }; }
  const b = $('pause');
  b.textContent = p ? 'resume' : 'pause';
  b.setAttribute('aria-pressed', String(p));
  document.body.dataset.paused = String(p);
  for (const name of PLOTS) dirty.plots.add(name);
  schedule();
}

function connect() {
  const es = new EventSource('/events');
  es.onopen = () => {
    $('conn').dataset.state = 'live';
    $('conn').textContent = 'live';
    // Subscribed: now the state, and the events after it.
    load().catch(fail);
  };
  es.onerror = () => {
    $('conn').dataset.state = 'connecting';
    $('conn').textContent = 'reconnecting';
  };
  es.onmessage = m => {
    const rx = performance.now();
    const ev = JSON.parse(m.data);
    ev.rx = rx;
    perf.parse_ms += performance.now() - rx;
    if (queue.length >= MAX_QUEUE) { queue = []; stale = true; }
    queue.push(ev);
    if (paused) { waiting.events += 1; if (ev.type === 'verdict') waiting.verdicts += 1; }
    schedule();
  };
  es.addEventListener('resync', () => { stale = true; schedule(); });
}

$('pause').addEventListener('click', () => setPaused(!paused));
$('filter-text').addEventListener('input', e => { F.text = e.target.value.trim().toLowerCase(); dirty.filter = true; schedule(); });
$('filter-status').addEventListener('change', e => { F.status = e.target.value; dirty.filter = true; schedule(); });
setInterval(() => {
  if (S === null || paused) return;
  pruneHistory(viewNow());
  for (const name of PLOTS) dirty.plots.add(name);
  schedule();
}, 1000);
connect();
