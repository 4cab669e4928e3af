// stately's web console. Plain script, no dependencies: it calls the API as JSON
// (POST /api/stately.v1.<Service>/<Method>, streams as one {"result": ...} per line) with the
// token in a header. Every text from the daemon goes into the page as text, never as HTML.
'use strict';

const TERMINAL = ['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED'];
const S = {
  token: sessionStorage.getItem('stately.token') || '',
  me: null,
  view: null,      // the current view's teardown: aborts its streams and timers
};

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, message, http) {
    super(status + ': ' + message);
    this.status = status;       // the gRPC code's name, e.g. PERMISSION_DENIED
    this.detail = message;
    this.http = http;
  }
}

function headers() {
  const h = { 'content-type': 'application/json' };
  if (S.token) h.authorization = 'Bearer ' + S.token;
  return h;
}

async function errorOf(r) {
  const text = await r.text();
  try {
    const e = JSON.parse(text).error;
    return new ApiError(e.status, e.message, r.status);
  } catch (_) {
    return new ApiError('UNAVAILABLE', text.slice(0, 200) || ('HTTP ' + r.status), r.status);
  }
}

// A unary call. A network failure marks the connection lost; an answer marks it back.
async function call(method, body, signal) {
  let r;
  try {
    r = await fetch('/api/stately.v1.' + method, {
      method: 'POST', headers: headers(), body: JSON.stringify(body || {}), signal,
    });
  } catch (e) {
    if (e.name !== 'AbortError') connection('reconnecting');
    throw e.name === 'AbortError' ? e : new ApiError('UNAVAILABLE', 'statelyd cannot be reached');
  }
  connection('connected');
  if (!r.ok) throw await errorOf(r);
  return r.json();
}

// A server stream: onResult for each message; resolves when the stream ends.
async function stream(method, body, onResult, signal) {
  let r;
  try {
    r = await fetch('/api/stately.v1.' + method, {
      method: 'POST', headers: headers(), body: JSON.stringify(body || {}), signal,
    });
  } catch (e) {
    if (e.name !== 'AbortError') connection('reconnecting');
    throw e.name === 'AbortError' ? e : new ApiError('UNAVAILABLE', 'statelyd cannot be reached');
  }
  connection('connected');
  if (!r.ok) throw await errorOf(r);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === 'AbortError' || (signal && signal.aborted)) throw e;
      connection('reconnecting');
      throw new ApiError('UNAVAILABLE', 'the stream broke');
    }
    if (chunk.done) break;
    buf += decoder.decode(chunk.value, { stream: true });
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!line.trim()) continue;
      const m = JSON.parse(line);
      if (m.error) throw new ApiError(m.error.status, m.error.message, m.error.code);
      onResult(m.result);
    }
  }
}

// A stream that reconnects by itself (backing off) until stop() or done() says so; `resume`
// builds each attempt's request, so a job's events resume after the last one seen.
function resilient(method, resume, onResult, opts) {
  const ctl = new AbortController();
  let pause = 250;
  (async () => {
    while (!ctl.signal.aborted) {
      try {
        await stream(method, resume(), (m) => { pause = 250; onResult(m); }, ctl.signal);
        if (opts.done && opts.done()) return;
      } catch (e) {
        if (ctl.signal.aborted) return;
        if (e.status && e.status !== 'UNAVAILABLE' && e.status !== 'CANCELLED') {
          if (opts.onError) opts.onError(e);
          return;
        }
      }
      if (opts.done && opts.done()) return;
      await sleep(pause, ctl.signal);
      pause = Math.min(pause * 2, 3000);
    }
  })();
  return () => ctl.abort();
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

// ---------- the page's frame ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

// Replaces an element's children, as h() takes them (arrays flattened, nothing for null).
function fill(el, ...children) {
  el.replaceChildren(...children.flat(2).filter((c) => c !== undefined && c !== null && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
}

function connection(state) {
  const el = $('conn');
  if (el.dataset.state === state) return;
  el.dataset.state = state;
  el.textContent = state;
}

function say(text, isError) {
  const m = $('message');
  m.hidden = !text;
  m.textContent = text || '';
  m.className = isError ? 'error' : '';
}

function sayError(e) {
  say(e instanceof ApiError ? e.message : String(e), true);
}

const operator = () => S.me && S.me.role === 'operator';
const needsOperator = (what) => operator() ? null
  : 'your role is ' + (S.me ? S.me.role : 'unknown') + ': ' + what + ' needs operator';

function ts(t) {
  if (!t) return '';
  const d = new Date(t);
  return isNaN(d) ? '' : d.toLocaleString();
}

function ago(t) {
  if (!t) return '';
  const s = Math.max(0, (Date.now() - new Date(t).getTime()) / 1000);
  if (s < 60) return Math.floor(s) + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm';
  if (s < 86400) return Math.floor(s / 3600) + 'h';
  return Math.floor(s / 86400) + 'd';
}

function span(a, b) {
  if (!a) return '';
  const ms = (b ? new Date(b) : new Date()) - new Date(a);
  return ms < 1000 ? ms + ' ms' : (ms / 1000).toFixed(1) + ' s';
}

const short = (s) => (s || '').replace(/^JOB_STATE_|^STEP_STATE_|^SERVER_STATE_/, '');

// What a job is about, in a few words, from its spec.
function what(job) {
  const spec = job.spec || {};
  const [kind, v] = Object.entries(spec).find(([, x]) => x) || ['', {}];
  switch (kind) {
    case 'runbook': return v.runbook + ' ' + Object.entries(v.params || {}).map(([k, x]) => k + '=' + x).join(' ');
    case 'haproxyApply': return v.target;
    case 'haproxyEdit': return v.target + ': ' + (v.edits || []).map((e) => Object.keys(e).find((k) => e[k])).join(', ');
    case 'haproxyServerState': return v.target + ' ' + v.backend + '/' + v.server + ' → ' + v.state;
    case 'alertWatch': return v.target + ' → ' + (v.to || []).join(', ');
    case 'certificateIssue': return (v.names || []).join(' ');
    case 'rollback': return 'of ' + v.targetJobId;
    default: return kind ? Object.values(v).filter((x) => typeof x === 'string').join(' ') : '';
  }
}

function describe(e) {
  if (e.stateChanged) return 'state ' + short(e.stateChanged.to) + (e.stateChanged.reason ? ' (' + e.stateChanged.reason + ')' : '');
  if (e.stepStarted) return 'step ' + (e.stepStarted.index + 1) + ' started: ' + e.stepStarted.name;
  if (e.stepFinished) return 'step ' + (e.stepFinished.index + 1) + ' ' + short(e.stepFinished.state).toLowerCase() + ': ' + e.stepFinished.name + (e.stepFinished.error ? ' — ' + e.stepFinished.error : '');
  if (e.progress) return 'progress ' + e.progress.done + '/' + e.progress.total + ' ' + e.progress.message;
  if (e.log) return e.log.message;
  return '';
}

// ---------- views ----------

function viewJobs(root) {
  const stateSel = h('select', { id: 'filter-state' }, h('option', { value: '' }, 'any state'),
    ['PENDING', 'RUNNING', 'CANCELLING', 'SUCCEEDED', 'FAILED', 'CANCELLED'].map((s) => h('option', { value: 'JOB_STATE_' + s }, s.toLowerCase())));
  const kindSel = h('select', { id: 'filter-kind' }, h('option', { value: '' }, 'any kind'),
    ['runbook', 'haproxy_apply', 'haproxy_edit', 'haproxy_server_state', 'alert_watch', 'certificate_issue', 'certificate_adopt', 'certificate_revoke', 'certificate_delete', 'rollback']
      .map((k) => h('option', { value: k }, k)));
  const body = h('tbody', { id: 'jobs' });
  root.append(h('h1', {}, 'Jobs'),
    h('div', { class: 'toolbar' }, stateSel, kindSel, h('span', { class: 'muted', id: 'jobs-count' })),
    h('table', {}, h('thead', {}, h('tr', {}, ['State', 'Kind', 'What', 'Started by', 'Age', 'Duration'].map((x) => h('th', {}, x)))), body));
  let stopped = false;
  const ctl = new AbortController();
  async function refresh() {
    const req = { pageSize: 100 };
    if (stateSel.value) req.states = [stateSel.value];
    if (kindSel.value) req.kind = kindSel.value;
    const r = await call('Jobs/ListJobs', req, ctl.signal);
    fill(body, ...r.jobs.map((j) => h('tr', {
      class: 'link', 'data-job-id': j.id, 'data-state': j.state, onclick: () => { location.hash = '#/jobs/' + j.id; },
    },
    h('td', {}, h('span', { class: 'state ' + j.state }, short(j.state))),
    h('td', {}, j.kind), h('td', {}, what(j)), h('td', {}, j.submittedBy),
    h('td', { title: ts(j.createdAt) }, ago(j.createdAt)),
    h('td', {}, span(j.startedAt, j.finishedAt)))));
    $('jobs-count').textContent = r.jobs.length + ' shown';
  }
  (async () => {
    while (!stopped) {
      try { await refresh(); } catch (e) { if (e.name !== 'AbortError' && e.status !== 'UNAVAILABLE') sayError(e); }
      await sleep(1000, ctl.signal);
    }
  })();
  stateSel.onchange = kindSel.onchange = () => refresh().catch(sayError);
  return () => { stopped = true; ctl.abort(); };
}

function viewJob(root, id) {
  const title = h('h1', {}, 'Job ', h('code', {}, id));
  const stateEl = h('span', { id: 'job-state', class: 'state' });
  const cancelBtn = h('button', { id: 'cancel', type: 'button', class: 'danger' }, 'Cancel');
  const rollbackBtn = h('button', { id: 'rollback', type: 'button' }, 'Roll back');
  const facts = h('dl', { id: 'job-facts' });
  const steps = h('ol', { class: 'steps', id: 'steps' });
  const undo = h('ul', { id: 'undo' });
  const events = h('div', { class: 'events', id: 'events' });
  // The list follows new events while its reader is at the bottom; the scrolling waits for
  // the next frame, so a chatty job costs one layout a frame, not one an event.
  let follow = true;
  let scrollQueued = false;
  // Where the list last scrolled itself: its own scroll event comes a frame later, when more
  // events may have been added below, and must not read as the reader leaving the bottom.
  let autoTop = 0;
  events.addEventListener('scroll', () => {
    const atBottom = events.scrollTop + events.clientHeight >= events.scrollHeight - 8;
    follow = atBottom || events.scrollTop >= autoTop - 1;
  });
  const keepAtBottom = () => {
    if (!follow || scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      events.scrollTop = events.scrollHeight;
      autoTop = events.scrollTop;
    });
  };
  root.append(title, h('div', { class: 'toolbar' }, stateEl, cancelBtn, rollbackBtn),
    h('div', { class: 'grid' },
      h('div', {}, h('h2', {}, 'Steps'), steps, h('h2', {}, 'Undo'), undo, h('h2', {}, 'Facts'), facts),
      h('div', {}, h('h2', {}, 'Events'), events)));
  let job = null;
  let last = 0;
  let ended = false;

  function render() {
    stateEl.className = 'state ' + job.state;
    stateEl.textContent = short(job.state);
    stateEl.dataset.state = job.state;
    const terminal = TERMINAL.includes(job.state);
    const cancelWhy = needsOperator('cancelling') || (terminal ? 'the job has ended' : null);
    cancelBtn.disabled = !!cancelWhy;
    cancelBtn.title = cancelWhy || 'cancel the job and undo what it did';
    const rollWhy = needsOperator('rolling back') || (job.state !== 'JOB_STATE_SUCCEEDED' ? 'only a succeeded job is rolled back'
      : job.rolledBackBy ? 'already rolled back by ' + job.rolledBackBy : null);
    rollbackBtn.disabled = !!rollWhy;
    rollbackBtn.title = rollWhy || 'undo this job\'s changes with a new job';
    fill(steps, ...(job.steps || []).map((s) => h('li', { class: s.state, 'data-state': s.state },
      h('span', { class: 'state ' + s.state }, short(s.state)), ' ', s.name,
      s.startedAt ? h('span', { class: 'muted' }, ' ' + span(s.startedAt, s.finishedAt)) : null,
      s.error ? h('div', { class: 'error' }, s.error) : null)));
    fill(undo, ...(job.undo || []).map((u) => h('li', {}, u.what, u.applied ? h('span', { class: 'muted' }, ' (undone)') : null)));
    if (!(job.undo || []).length) fill(undo, h('li', { class: 'muted' }, 'nothing to undo'));
    const link = (jid) => h('a', { href: '#/jobs/' + jid }, jid);
    fill(facts,
      h('dt', {}, 'kind'), h('dd', {}, job.kind),
      h('dt', {}, 'what'), h('dd', {}, what(job)),
      h('dt', {}, 'started by'), h('dd', {}, job.submittedBy),
      h('dt', {}, 'created'), h('dd', {}, ts(job.createdAt)),
      h('dt', {}, 'duration'), h('dd', {}, span(job.startedAt, job.finishedAt)),
      job.error ? [h('dt', {}, 'error'), h('dd', { class: 'error' }, job.error)] : null,
      job.rollbackOf ? [h('dt', {}, 'rolls back'), h('dd', {}, link(job.rollbackOf))] : null,
      job.rolledBackBy ? [h('dt', {}, 'rolled back by'), h('dd', { id: 'rolled-back-by' }, link(job.rolledBackBy))] : null,
      job.unwindIncomplete ? [h('dt', {}, 'unwind'), h('dd', { class: 'error' }, 'incomplete: retried by the daemon')] : null);
  }

  async function load() {
    job = await call('Jobs/GetJob', { jobId: id });
    render();
  }

  cancelBtn.onclick = async () => {
    try {
      await call('Jobs/CancelJob', { jobId: id, reason: 'cancelled from the console by ' + (S.me ? S.me.identity : '?') });
      say('cancel requested: the job unwinds');
    } catch (e) { sayError(e); }
  };
  rollbackBtn.onclick = async () => {
    try {
      const r = await call('Jobs/RollbackJob', { jobId: id });
      say('rollback started: job ' + r.id);
      location.hash = '#/jobs/' + r.id;
    } catch (e) { sayError(e); }
  };

  let reading = false;
  let stale = false;
  async function reread() {
    stale = true;
    if (reading) return;
    reading = true;
    while (stale) {
      stale = false;
      try { await load(); } catch (e) { sayError(e); }
    }
    reading = false;
  }
  const stop = resilient('Jobs/WatchJob', () => ({ jobId: id, afterSeq: String(last) }), (e) => {
    const seq = Number(e.seq);
    if (seq <= last) return;   // resumed: never show an event twice
    last = seq;
    const level = e.log ? (e.log.level === 'LOG_LEVEL_ERROR' ? 'error' : e.log.level === 'LOG_LEVEL_WARN' ? 'warn' : '') : '';
    events.append(h('div', { class: level, 'data-seq': seq }, h('span', { class: 'muted' }, seq + ' '), describe(e)));
    keepAtBottom();
    if (e.stateChanged && TERMINAL.includes(e.stateChanged.to)) ended = true;
    if (e.stateChanged && job) { job.state = e.stateChanged.to; render(); }
    // Steps and undo entries come from GetJob: read again after each change, and once more
    // when a change arrives while a read is in flight (its answer may predate the change).
    if (!e.log && !e.progress) reread();
  }, { done: () => ended, onError: sayError });

  load().catch(sayError);
  return stop;
}

const SERVER_CLASS = {
  SERVER_STATE_UP: 'UP', SERVER_STATE_DOWN: 'DOWN', SERVER_STATE_MAINT: 'MAINT',
  SERVER_STATE_DRAIN: 'DRAIN', SERVER_STATE_NOLB: 'NOLB', SERVER_STATE_NO_CHECK: 'NO_CHECK',
};

function viewHaproxy(root) {
  root.append(h('h1', {}, 'HAProxy'));
  const stops = [];
  (async () => {
    const r = await call('Haproxy/ListTargets', {});
    for (const t of r.targets) {
      const section = h('section', { 'data-target': t.name });
      root.append(section);
      section.append(h('h2', {}, t.name));
      if (t.hasStats) stops.push(serverTable(section, t.name));
      if (t.hasConfig) configView(section, t.name);
    }
    if (!r.targets.length) root.append(h('p', { class: 'muted' }, 'no [[haproxy]] targets are configured'));
  })().catch(sayError);
  return () => stops.forEach((s) => s());
}

function serverTable(section, target) {
  const body = h('tbody', {});
  const note = h('p', { class: 'muted' });
  section.append(h('table', { class: 'servers' }, h('thead', {}, h('tr', {},
    ['Backend', 'Server', 'Status', 'Sessions', 'Rate', 'Check', 'Address', ''].map((x) => h('th', {}, x)))), body), note);
  const rows = new Map();   // "proxy/server" -> StatsRow
  const key = (r) => r.proxy + '/' + r.server;
  function render() {
    const servers = [...rows.values()].filter((r) => r.type === 'ROW_TYPE_SERVER')
      .sort((a, b) => key(a).localeCompare(key(b)));
    fill(body, ...servers.map((r) => {
      const st = r.status || {};
      const cls = st.transitional ? 'going' : (SERVER_CLASS[st.state] || 'other');
      const why = needsOperator('changing a server\'s state');
      const btn = (state) => h('button', {
        type: 'button', disabled: !!why, title: why || 'set ' + r.server + ' to ' + state, 'data-action': state,
        onclick: () => setServer(target, r.proxy, r.server, state),
      }, state);
      return h('tr', { class: 'srv-' + cls, 'data-server': key(r), 'data-status': short(st.state) },
        h('td', {}, r.proxy), h('td', {}, r.server), h('td', { class: 'status' }, st.raw || short(st.state)),
        h('td', {}, r.currentSessions ?? ''), h('td', {}, r.sessionRate ?? ''),
        h('td', {}, r.checkStatus + (r.checkDescription ? ' ' + r.checkDescription : '')),
        h('td', {}, r.address), h('td', {}, btn('ready'), ' ', btn('drain'), ' ', btn('maint')));
    }));
  }
  return resilient('Stats/WatchStats', () => ({ target, changesOnly: true }), (u) => {
    if (u.snapshot) {
      rows.clear();
      for (const r of u.snapshot.rows) rows.set(key(r), r);
      note.textContent = 'poll ' + u.poll + ' at ' + ts(u.at);
    } else if (u.delta) {
      for (const c of u.delta.changed || []) rows.set(key(c.row), c.row);
      for (const r of u.delta.added || []) rows.set(key(r), r);
      for (const r of u.delta.removed || []) rows.delete(key(r));
      note.textContent = 'poll ' + u.poll + ' at ' + ts(u.at);
    } else if (u.unreachable) {
      note.textContent = 'the stats socket cannot be read: ' + u.unreachable;
    }
    render();
  }, { onError: sayError });
}

async function setServer(target, backend, server, state) {
  try {
    const job = await call('Jobs/SubmitJob', { spec: { haproxyServerState: { target, backend, server, state } } });
    say('job ' + job.id + ': ' + backend + '/' + server + ' → ' + state);
  } catch (e) { sayError(e); }
}

function configView(section, target) {
  const pre = h('pre', { class: 'config' });
  const version = h('span', { class: 'muted' });
  const edits = h('textarea', { placeholder: '[{"forceHttps": {"frontend": "web"}}]', 'aria-label': 'edits as JSON' });
  const diff = h('pre', { class: 'diff', hidden: true });
  const preview = h('button', { type: 'button', 'data-action': 'preview-edits' }, 'Preview edits');
  // Applies what was previewed, on the version it was previewed on (a later change of the
  // file refuses the job rather than editing what nobody saw).
  const apply = h('button', { type: 'button', 'data-action': 'apply-edits', disabled: true }, 'Apply (a haproxy_edit job)');
  let previewed = null;
  // PreviewEdits is an operator's call (it runs haproxy -c on the candidate).
  const viewerWhy = needsOperator('previewing edits');
  preview.disabled = !!viewerWhy;
  preview.title = viewerWhy || 'show the diff, and what haproxy -c says';
  apply.title = viewerWhy || 'preview a valid change first';
  edits.oninput = () => { previewed = null; apply.disabled = true; };
  preview.onclick = async () => {
    let list;
    const asked = edits.value;
    try { list = JSON.parse(asked || '[]'); } catch (e) { say('the edits are not JSON: ' + e.message, true); return; }
    try {
      const p = await call('Haproxy/PreviewEdits', { target, edits: list });
      // Typed over while it was asked: that preview is not of what the box says.
      if (edits.value !== asked) return;
      diff.hidden = false;
      fill(diff, ...(p.changed ? p.diff : 'no change\n').split('\n').map((l) =>
        h('div', { class: /^(\+\+\+|---) /.test(l) ? 'head' : l.startsWith('+') ? 'add' : l.startsWith('-') ? 'del' : l.startsWith('@@') ? 'hunk' : '' }, l)),
      ...(p.notes || []).map((n) => h('div', { class: 'muted note' }, n)),
      h('div', { class: p.valid ? 'muted verdict' : 'error verdict' }, p.valid ? (p.changed ? 'valid; goes live by ' + p.goesLiveBy : 'nothing to apply') : 'haproxy -c refuses it'),
      ...(p.diagnostics || []).map((d) => h('div', { class: 'error' }, JSON.stringify(d))));
      previewed = p.changed && p.valid ? { list, base: p.currentVersion } : null;
      const why = needsOperator('applying edits');
      apply.disabled = !previewed || !!why;
      apply.title = why || (previewed ? 'apply on version ' + p.currentVersion.slice(0, 19) : 'preview a valid change first');
    } catch (e) { sayError(e); }
  };
  apply.onclick = async () => {
    if (!previewed) return;
    // Once: a second click (or a retry) is the same job, by its request id.
    apply.disabled = true;
    // (getRandomValues, not randomUUID: the latter needs a secure context.)
    previewed.requestId = previewed.requestId || 'console-' + Array.from(crypto.getRandomValues(new Uint8Array(16)), (x) => x.toString(16).padStart(2, '0')).join('');
    try {
      const j = await call('Jobs/SubmitJob', { spec: { haproxyEdit: { target, edits: previewed.list, baseVersion: previewed.base } }, requestId: previewed.requestId });
      location.hash = '#/jobs/' + j.id;
    } catch (e) { apply.disabled = false; sayError(e); }
  };
  section.append(h('details', {}, h('summary', {}, 'Configuration ', version), pre),
    h('details', { class: 'edits' }, h('summary', {}, 'Preview structured edits'), edits, preview, apply, diff));
  call('Haproxy/GetConfig', { target }).then((c) => {
    version.textContent = 'version ' + c.version.slice(0, 12);
    pre.textContent = c.text;
  }).catch(sayError);
}

function viewCerts(root) {
  const body = h('tbody', { id: 'certs' });
  root.append(h('h1', {}, 'Certificates'), h('table', {}, h('thead', {}, h('tr', {},
    ['Lineage', 'Names', 'Days left', 'Version', 'Deploys to', 'Next renewal', 'Last issuance', ''].map((x) => h('th', {}, x)))), body));
  const ctl = new AbortController();
  (async () => {
    const r = await call('Certificates/ListCertificates', {}, ctl.signal);
    const certs = r.certificates.sort((a, b) => Number(a.daysLeft) - Number(b.daysLeft));
    for (const c of certs) {
      const last = h('td', {});
      const why = needsOperator('renewing');
      body.append(h('tr', { 'data-lineage': c.name, class: Number(c.daysLeft) < 14 ? 'srv-going' : '' },
        h('td', {}, c.name), h('td', {}, (c.names || []).join(' ')), h('td', {}, c.daysLeft),
        h('td', {}, c.version + ' of ' + (c.versions || []).join(',')), h('td', {}, (c.deploy || []).join(', ')),
        h('td', {}, ts(c.nextRenewal)), last,
        h('td', {}, h('button', { type: 'button', disabled: !!why, title: why || 'renew now', onclick: async () => {
          try { const j = await call('Certificates/RenewCertificate', { name: c.name }); location.hash = '#/jobs/' + j.id; } catch (e) { sayError(e); }
        } }, 'Renew'))));
      call('Certificates/GetCertificate', { name: c.name }, ctl.signal).then((full) => {
        if (full.issuedByJob) fill(last, h('a', { href: '#/jobs/' + full.issuedByJob }, full.issuedByJob));
      }).catch(() => {});
    }
    if (!certs.length) body.append(h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'no lineages')));
  })().catch(sayError);
  return () => ctl.abort();
}

function viewAlerts(root) {
  const outbox = h('p', { id: 'outbox' });
  const list = h('div', { id: 'watches' });
  root.append(h('h1', {}, 'Alerts'), outbox, list);
  const ctl = new AbortController();
  (async () => {
    const st = await call('Jobs/GetStatus', {}, ctl.signal);
    outbox.textContent = 'outbox: ' + st.outboxPending + ' message(s) waiting to be delivered';
    const r = await call('Jobs/ListJobs', { kind: 'alert_watch', states: ['JOB_STATE_RUNNING'], pageSize: 50 }, ctl.signal);
    if (!r.jobs.length) list.append(h('p', { class: 'muted' }, 'no alert watch is running'));
    for (const j of r.jobs) {
      const ev = h('div', { class: 'events' });
      list.append(h('h2', {}, h('a', { href: '#/jobs/' + j.id }, what(j))), ev);
      // The recent transitions and deliveries: the watch's last 30 events, then stop.
      const lastSeq = Number(j.lastSeq);
      const from = Math.max(0, lastSeq - 30);
      const sub = new AbortController();
      ctl.signal.addEventListener('abort', () => sub.abort());
      stream('Jobs/WatchJob', { jobId: j.id, afterSeq: String(from) }, (e) => {
        if (e.log) ev.append(h('div', {}, ts(e.at) + '  ' + e.log.message));
        if (Number(e.seq) >= lastSeq) sub.abort();
      }, sub.signal).catch(() => {});
    }
  })().catch((e) => { if (e.name !== 'AbortError') sayError(e); });
  return () => ctl.abort();
}

// ---------- routing and sign-in ----------

function route() {
  if (S.view) { S.view(); S.view = null; }
  say('');
  const main = $('main');
  const login = $('login');
  fill(main, login);
  if (!S.me) { login.hidden = false; return; }
  login.hidden = true;
  const root = h('div', { id: 'view' });
  main.append(root);
  const [, view, id] = (location.hash || '#/jobs').split('/');
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.view === view);
  if (view === 'jobs' && id) S.view = viewJob(root, decodeURIComponent(id));
  else if (view === 'haproxy') S.view = viewHaproxy(root);
  else if (view === 'certs') S.view = viewCerts(root);
  else if (view === 'alerts') S.view = viewAlerts(root);
  else S.view = viewJobs(root);
}

async function signIn() {
  S.me = await call('Jobs/WhoAmI', {});
  const st = await call('Jobs/GetStatus', {});
  $('who').textContent = S.me.identity + ' · ' + S.me.role;
  $('who').dataset.role = S.me.role;
  $('server').textContent = 'statelyd ' + st.version + ' · node ' + st.node + ' · ' + location.host +
    ((st.unwindIncompleteJobIds || []).length ? ' · unwind incomplete: ' + st.unwindIncompleteJobIds.join(', ') : '');
  $('nav').hidden = false;
  $('logout').hidden = false;
}

// While signed in, the header keeps the connection state true even on a quiet view.
async function heartbeat() {
  for (;;) {
    await sleep(2000);
    if (!S.me) continue;
    try { await call('Jobs/GetStatus', {}); } catch (_) { /* connection() says it */ }
  }
}

window.addEventListener('DOMContentLoaded', async () => {
  $('login').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    S.token = $('token').value.trim();
    try {
      await signIn();
      sessionStorage.setItem('stately.token', S.token);
      $('token').value = '';
      $('login-error').textContent = '';
      route();
    } catch (e) {
      S.me = null;
      $('login-error').textContent = e instanceof ApiError ? e.message : String(e);
    }
  });
  $('logout').onclick = () => {
    sessionStorage.removeItem('stately.token');
    S.token = ''; S.me = null;
    $('nav').hidden = true; $('logout').hidden = true; $('who').textContent = '';
    route();
  };
  window.addEventListener('hashchange', route);
  // A token from this tab's session, or a client certificate, signs in by itself; a daemon
  // that is restarting is waited for.
  for (let pause = 250; ; pause = Math.min(pause * 2, 3000)) {
    try { await signIn(); break; } catch (e) {
      if (e.status !== 'UNAVAILABLE') { S.me = null; break; }
      await sleep(pause);
    }
  }
  route();
  heartbeat();
});
