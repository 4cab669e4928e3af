// The console's figures in a real headless Chromium (playwright-core, Debian's chromium),
// driven by benches/console.rs, which runs statelyd and the gRPC side. What only the harness
// can do (submit a job over gRPC, read statelyd's memory) is asked for on stdout as
// `ask: <what>` and answered on stdin with `ok [value]`; figures go back as
// `result: <name> <json>`.
import { ask, launch, signIn } from '../../tests/console/harness.mjs';

const URL_ = process.env.CONSOLE_URL;
const TOKEN = process.env.OPERATOR_TOKEN;
const LOADS = Number(process.env.LOADS || 11);
const RUNS = Number(process.env.RUNS || 3);
const CONSOLES = Number(process.env.CONSOLES || 20);

const result = (name, v) => process.stdout.write('result: ' + name + ' ' + JSON.stringify(v) + '\n');

// Runs in the page before its own script (injected by the browser, not subject to the CSP):
// the wall-clock time each job row and each event line is put into the page.
const OBSERVE = () => {
  window.__rows = new Map();     // job id -> when its row first appeared
  window.__events = [];          // [text, when] per event line
  window.__firstRow = null;      // ms since navigation start
  const now = () => performance.timeOrigin + performance.now();
  new MutationObserver((records) => {
    const t = now();
    for (const r of records) {
      for (const n of r.addedNodes) {
        if (!(n instanceof Element)) continue;
        if (n.dataset.jobId) {
          if (window.__firstRow === null) window.__firstRow = performance.now();
          if (!window.__rows.has(n.dataset.jobId)) window.__rows.set(n.dataset.jobId, t);
        }
        if (n.dataset.seq) window.__events.push([n.lastChild.textContent, t]);
      }
    }
  }).observe(document, { childList: true, subtree: true });
};

const browser = await launch(['--disable-renderer-backgrounding', '--disable-background-timer-throttling']);
try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await ctx.addInitScript(OBSERVE);
  const page = await ctx.newPage();
  await signIn(page, URL_, TOKEN);

  // Page load to its first job row: a reload of #/jobs, signed in (the token is in the tab's
  // sessionStorage), from the navigation's start.
  await page.evaluate(() => { location.hash = '#/jobs'; });
  await page.waitForSelector('#jobs [data-job-id]');
  const loads = [];
  for (let i = 0; i < LOADS; i++) {
    await page.reload();
    await page.waitForFunction(() => window.__firstRow !== null, null, { timeout: 20000 });
    loads.push(await page.evaluate(() => window.__firstRow));
  }
  result('load_ms', loads);

  // A job submitted over gRPC to its row in the open jobs table.
  const appear = [];
  for (let i = 0; i < LOADS; i++) {
    const [id, at] = (await ask('submit')).split(' ');
    await page.waitForSelector(`#jobs [data-job-id="${id}"]`, { timeout: 20000 });
    const t = await page.evaluate((j) => window.__rows.get(j), id);
    appear.push(t - Number(at));
  }
  result('row_ms', appear);

  // Event latency: a job printing its own clock as it goes, watched by this page and by a
  // gRPC WatchJob client at once.
  for (let run = 0; run < RUNS; run++) {
    const id = await ask('ticks');
    await page.evaluate((j) => { window.__events = []; location.hash = '#/jobs/' + j; }, id);
    await page.waitForFunction(() => document.querySelector('#job-state')?.dataset.state === 'JOB_STATE_SUCCEEDED',
      null, { timeout: 60000 });
    result('events', await page.evaluate(() => window.__events));
    await ask('ticks-done');
  }

  // Memory per open console: CONSOLES more tabs, each in its own context (its own sign-in),
  // on the HAProxy page, which holds a live WatchStats stream and the heartbeat.
  await ask('rss-before');
  const tabs = [];
  for (let i = 0; i < CONSOLES; i++) {
    const c = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const p = await c.newPage();
    await signIn(p, URL_, TOKEN);
    await p.evaluate(() => { location.hash = '#/haproxy'; });
    await p.waitForSelector('tr[data-server]');
    tabs.push(p);
  }
  await new Promise((r) => setTimeout(r, 3000));
  const heaps = [];
  for (const p of tabs) {
    const cdp = await p.context().newCDPSession(p);
    await cdp.send('Performance.enable');
    const m = await cdp.send('Performance.getMetrics');
    heaps.push(m.metrics.find((x) => x.name === 'JSHeapUsedSize').value);
  }
  result('heap_bytes', heaps);
  await ask('rss-after');
} catch (e) {
  process.stdout.write('FAILED: ' + (e.stack || e) + '\n');
  process.exitCode = 1;
} finally {
  await browser.close();
}
// The harness's answers on stdin would keep node alive.
process.exit(process.exitCode ?? 0);
