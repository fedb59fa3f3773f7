// The vmaudit dashboard: subscribes to /events first, then reads /api/state, then applies the
// events numbered after the state (so nothing is missed or applied twice). No framework.
'use strict';

const MAX_VERDICTS = 500;
const STATUSES = ['confirmed', 'violated', 'unconfirmed', 'unknown'];

let S = null; // the state, as /api/state gives it, kept current by the events
let pending = []; // events received while the state loads
let loading = false;

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

function vmKey(vm) { return vm.uuid || vm.name; }

async function load() {
  loading = true;
  const r = await fetch('/api/state', { cache: 'no-store' });
  const st = await r.json();
  S = {
    seq: st.seq,
    vms: st.vms,
    procs: new Map(st.processes.map(p => [p.pid, new Map(p.fds.map(f => [f.fd, f]))])),
    verdicts: st.verdicts.slice(-MAX_VERDICTS),
    totals: Object.fromEntries(STATUSES.map(s => [s, st.totals[s] || 0])),
    claims: st.claims,
    lost: Object.values(st.lost).reduce((a, b) => a + b, 0),
    decisions: st.decisions,
  };
  loading = false;
  const later = pending.filter(ev => ev.seq > S.seq);
  pending = [];
  renderAll();
  later.forEach(apply);
}

function apply(ev) {
  if (ev.seq <= S.seq) return;
  S.seq = ev.seq;
  switch (ev.type) {
    case 'vm': {
      const i = S.vms.findIndex(v => vmKey(v) === vmKey(ev.vm));
      if (i >= 0) S.vms[i] = ev.vm; else S.vms.push(ev.vm);
      renderVms();
      renderFdTables();
      break;
    }
    case 'fd': {
      let t = S.procs.get(ev.pid);
      if (!t) { t = new Map(); S.procs.set(ev.pid, t); }
      if (ev.row) t.set(ev.fd, ev.row); else t.delete(ev.fd);
      if (S.vms.some(v => v.pid === ev.pid)) { renderFdTable(ev.pid); renderVms(); }
      break;
    }
    case 'verdict':
      S.totals[ev.verdict.status] += 1;
      S.verdicts.push(ev.verdict);
      if (S.verdicts.length > MAX_VERDICTS) S.verdicts.shift();
      $('verdict-rows').prepend(verdictRow(ev.verdict));
      trimVerdictRows();
      renderTotals();
      break;
    case 'claim':
      S.claims += 1;
      renderTotals();
      break;
    case 'gap':
      S.lost += Object.values(ev.gap.causes).reduce((a, b) => a + b, 0);
      renderTotals();
      break;
    case 'decision':
      S.decisions[ev.decision.allowed ? 'allowed' : 'denied'] += 1;
      renderTotals();
      break;
  }
}

function renderAll() {
  renderTotals();
  renderVms();
  renderFdTables();
  const body = $('verdict-rows');
  body.replaceChildren(...S.verdicts.slice().reverse().map(verdictRow));
}

function renderTotals() {
  for (const s of STATUSES) document.querySelector(`#totals .count[data-status="${s}"]`).textContent = S.totals[s];
  $('claims').textContent = S.claims;
  $('allowed').textContent = S.decisions.allowed;
  $('denied').textContent = S.decisions.denied;
  $('lost').textContent = S.lost;
}

function renderVms() {
  $('vm-rows').replaceChildren(...S.vms.map(vm => el('tr',
    { class: 'vm', 'data-name': vm.name, 'data-uuid': vm.uuid, 'data-pid': vm.pid, 'data-state': vm.state },
    el('td', { class: 'name' }, vm.name),
    el('td', { class: 'uuid mono' }, vm.uuid),
    el('td', { class: 'pid' }, vm.pid || '?'),
    el('td', { class: 'state' }, vm.state),
    el('td', { class: 'nfds' }, (S.procs.get(vm.pid) || new Map()).size))));
}

function renderFdTables() {
  const box = $('fdtables');
  const pids = S.vms.filter(v => v.pid).map(v => v.pid);
  for (const sec of [...box.children]) {
    if (!pids.includes(Number(sec.dataset.pid))) sec.remove();
  }
  pids.forEach(renderFdTable);
}

function renderFdTable(pid) {
  const vm = S.vms.find(v => v.pid === pid);
  if (!vm) return;
  const box = $('fdtables');
  let sec = box.querySelector(`section.fdtable[data-pid="${pid}"]`);
  if (!sec) {
    sec = el('section', { class: 'fdtable', 'data-pid': pid });
    box.append(sec);
  }
  const fds = [...(S.procs.get(pid) || new Map()).values()].sort((a, b) => a.fd - b.fd);
  const rows = fds.map(f => {
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
      el('td', { class: 'since' }, f.since_ns ? (f.since_ns / 1e9).toFixed(3) : 'before watch'),
      el('td', { class: 'claim' }, c ? `#${c.id} ${c.kind}${c.mac ? ' ' + c.mac : ''}${c.status ? ' (' + c.status + ')' : ''}` : ''));
  });
  sec.replaceChildren(
    el('h3', {}, `${vm.name} · emulator pid ${pid} · ${fds.length} fds `, el('small', {}, vm.state)),
    el('table', {},
      el('thead', {}, el('tr', {}, ...['fd', 'path', 'kind', 'rdev', 'cloexec', 'via', 'since (s, boot clock)', 'claim'].map(h => el('th', {}, h)))),
      el('tbody', {}, ...(rows.length ? rows : [el('tr', {}, el('td', { class: 'empty', colspan: 8 }, 'no fds'))]))));
}

function verdictRow(v) {
  const ev = v.evidence.map(e => [`pid ${e.pid}`, e.fd !== undefined ? `fd ${e.fd}` : null, e.what, e.path, e.rdev]
    .filter(x => x !== null && x !== undefined).join(' ')).join('; ');
  return el('tr', {
    class: `verdict ${v.status}`, 'data-status': v.status, 'data-claim-id': v.claim.id, 'data-claim-kind': v.claim.kind,
  },
    el('td', { class: 'ts mono' }, v.ts),
    el('td', { class: 'status' }, v.status),
    el('td', { class: 'claim' }, `#${v.claim.id} ${v.claim.kind}${v.claim.mac ? ' ' + v.claim.mac : ''}`),
    el('td', { class: 'reason' }, v.reason),
    el('td', { class: 'evidence' }, ev));
}

function trimVerdictRows() {
  const body = $('verdict-rows');
  while (body.children.length > MAX_VERDICTS) body.lastElementChild.remove();
}

function connect() {
  const es = new EventSource('/events');
  es.onopen = () => {
    $('conn').dataset.state = 'live';
    $('conn').textContent = 'live';
    // Subscribed: now the state, and the events after it.
    load().catch(e => { $('conn').textContent = `state: ${e}`; });
  };
  es.onerror = () => {
    $('conn').dataset.state = 'connecting';
    $('conn').textContent = 'reconnecting';
  };
  es.onmessage = m => {
    const ev = JSON.parse(m.data);
    if (loading || S === null) pending.push(ev); else apply(ev);
  };
  es.addEventListener('resync', () => { load(); });
}

connect();
