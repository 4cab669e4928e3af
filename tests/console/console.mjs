// Drives the web console in a real headless Chromium (playwright-core, Debian's chromium)
// against a real statelyd and haproxy that tests/console.rs started. What only the test
// harness can do (submit over gRPC, stop a backend, restart statelyd, look at files) is asked
// for on stdout as `ask: <what> [arg]` and answered on stdin with one line: `ok [value]` or
// `fail <why>`. Exits 0 when every check passed; otherwise prints `FAILED: <why>` and exits 1.
import { ask, launch, signIn as signInAt } from './harness.mjs';

const URL_ = process.env.CONSOLE_URL;
const OPERATOR = process.env.OPERATOR_TOKEN;
const VIEWER = process.env.VIEWER_TOKEN;
const SHOTS = process.env.SCREENSHOTS;
const POLL_MS = 1000;   // the stats poll interval the daemon runs with

const step = (s) => process.stdout.write('step: ' + s + '\n');

function check(cond, why) { if (!cond) throw new Error(why); }

const signIn = (page, token) => signInAt(page, URL_, token);

async function jobState(page) {
  return page.getAttribute('#job-state', 'data-state');
}

async function waitState(page, state, ms = 15000) {
  await page.waitForFunction((s) => document.querySelector('#job-state')?.dataset.state === s, state, { timeout: ms });
}

async function seqs(page) {
  return page.$$eval('#events [data-seq]', (els) => els.map((e) => Number(e.dataset.seq)));
}

function contiguous(list) {
  return list.every((s, i) => s === i + 1);
}

const browser = await launch();
let failed = null;
let current = null;   // the page a failure is photographed on
try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  current = page;
  const problems = [];
  // Refused calls and a restarting daemon log "Failed to load resource"; anything else the
  // page logs as an error, or throws, is a fault.
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(m.text()); });
  page.on('pageerror', (e) => problems.push(String(e)));

  step('the security headers of the page');
  const resp = await page.goto(URL_);
  const hdr = resp.headers();
  check(hdr['content-security-policy']?.includes("frame-ancestors 'none'"), 'CSP with frame-ancestors: ' + hdr['content-security-policy']);
  check(hdr['content-security-policy']?.includes("script-src 'self'"), 'CSP with script-src self');
  check(!hdr['set-cookie'], 'no cookie is set');

  step('a wrong token is refused on the sign-in form');
  await page.fill('#token', 'not-a-token-of-this-daemon');
  await page.click('#login button[type=submit]');
  await page.waitForFunction(() => document.querySelector('#login-error').textContent.includes('UNAUTHENTICATED'));

  step('sign in as operator');
  await signIn(page, OPERATOR);
  const who = await page.textContent('#who');
  check(who.includes('token:op') && who.includes('operator'), 'the header names the caller: ' + who);
  check((await page.getAttribute('#conn', 'data-state')) === 'connected', 'the header says connected');
  const server = await page.textContent('#server');
  check(/^statelyd \d+\.\d+\.\d+ · node edge-7 · /.test(server), 'the header names the version and node: ' + server);
  check(!(await ctx.cookies()).length, 'no cookies after sign-in');

  step('a runbook job submitted over gRPC appears and its steps stream');
  const blocked = await ask('submit-block cancelme');
  const t0 = Date.now();
  await page.waitForSelector(`#jobs tr[data-job-id="${blocked}"]`);
  process.stdout.write('figure: first job row ' + (Date.now() - t0) + ' ms after submission\n');
  await page.click(`#jobs tr[data-job-id="${blocked}"]`);
  await page.waitForFunction(() => [...document.querySelectorAll('#events div')].some((d) => d.textContent.includes('ready')));
  await page.waitForFunction(() => document.querySelectorAll('#steps li')[1]?.dataset.state === 'STEP_STATE_RUNNING');
  check((await page.getAttribute('#steps li:first-child', 'data-state')) === 'STEP_STATE_SUCCEEDED', 'step 1 succeeded');
  if (SHOTS) await page.screenshot({ path: SHOTS + '/job-running.png', fullPage: true });

  step('cancel it from the page: CANCELLED, the unwind shown, the file restored');
  check(!(await page.isDisabled('#cancel')), 'an operator may cancel');
  await page.click('#cancel');
  await waitState(page, 'JOB_STATE_CANCELLED');
  await page.waitForFunction(() => [...document.querySelectorAll('#steps li')].some((l) => l.dataset.state === 'STEP_STATE_CANCELLED'));
  const undoText = await page.textContent('#undo');
  check(undoText.includes('cancelme.txt'), 'the undo entries name the file: ' + undoText);
  const events = await page.textContent('#events');
  check(/cancel/i.test(events), 'the events say it was cancelled: ' + events);
  await ask('restored cancelme');
  check(contiguous(await seqs(page)), 'every event once, in order: ' + await seqs(page));

  step('roll back a finished job from the page');
  const wrote = await ask('submit-write rollme');
  await page.goto(URL_ + '#/jobs/' + wrote);
  await waitState(page, 'JOB_STATE_SUCCEEDED');
  await page.waitForSelector('#rollback:not([disabled])');
  await page.click('#rollback');
  await page.waitForFunction((id) => location.hash.startsWith('#/jobs/') && !location.hash.endsWith(id), wrote);
  await waitState(page, 'JOB_STATE_SUCCEEDED');
  await ask('restored rollme');
  await page.goto(URL_ + '#/jobs/' + wrote);
  await page.waitForSelector('#rolled-back-by a');
  check(await page.isDisabled('#rollback'), 'a rolled-back job cannot be rolled back again');

  step('the HAProxy table in the stats page colours; a server taken down turns DOWN');
  await page.goto(URL_ + '#/haproxy');
  await page.waitForSelector('tr[data-server="web/s1"][data-status="UP"]');
  await page.waitForSelector('tr[data-server="web/s2"][data-status="UP"]');
  check((await page.getAttribute('tr[data-server="web/s1"]', 'class')).includes('srv-UP'), 'an UP row is coloured UP');
  if (SHOTS) await page.screenshot({ path: SHOTS + '/haproxy.png', fullPage: true });
  await ask('backend-down s1');
  const down0 = Date.now();
  // HAProxy needs its checks to fail (fall 2, inter 100ms) before it says DOWN; the page must
  // show it within a poll interval of that.
  await page.waitForSelector('tr[data-server="web/s1"][data-status="DOWN"]', { timeout: 3 * POLL_MS + 2000 });
  process.stdout.write('figure: DOWN on the page ' + (Date.now() - down0) + ' ms after the backend stopped\n');
  check((await page.getAttribute('tr[data-server="web/s1"]', 'class')).includes('srv-DOWN'), 'a DOWN row is coloured DOWN');

  step('drain a server from the page: a job, and the row follows');
  await page.click('tr[data-server="web/s2"] button[data-action="drain"]');
  await page.waitForSelector('tr[data-server="web/s2"][data-status="DRAIN"]', { timeout: 3 * POLL_MS + 2000 });
  const said = await page.textContent('#message');
  check(/job .* web\/s2 → drain/.test(said), 'the page names the job it started: ' + said);
  await page.click('tr[data-server="web/s2"] button[data-action="ready"]');
  await page.waitForSelector('tr[data-server="web/s2"][data-status="UP"]', { timeout: 3 * POLL_MS + 2000 });

  step('an edit previewed on the HAProxy page (its diff), then applied as a job');
  await page.click('details.edits summary');
  await page.fill('details.edits textarea', JSON.stringify([{ setLine: { section: 'backend web', line: 'timeout server 31s' } }]));
  await page.click('button[data-action="preview-edits"]');
  await page.waitForSelector('details.edits .diff .add');
  const added = await page.$$eval('details.edits .diff .add', (els) => els.map((e) => e.textContent));
  check(added.some((l) => l.includes('timeout server 31s')), 'the diff adds the line: ' + added.join(' | '));
  check((await page.textContent('details.edits .verdict')).includes('goes live by reload'), 'the preview says how it goes live');
  if (SHOTS) await page.screenshot({ path: SHOTS + '/edit-preview.png', fullPage: true });
  await ask('config-has-not timeout server 31s');
  await page.click('button[data-action="apply-edits"]');
  await waitState(page, 'JOB_STATE_SUCCEEDED', 30000);
  await ask('config-has timeout server 31s');

  step('the other pages');
  await page.goto(URL_ + '#/certs');
  await page.waitForSelector('#certs tr');
  if (SHOTS) await page.screenshot({ path: SHOTS + '/certificates.png', fullPage: true });
  await page.goto(URL_ + '#/alerts');
  await page.waitForSelector('#outbox:not(:empty)');
  await page.goto(URL_ + '#/jobs');
  await page.waitForSelector('#jobs tr');
  if (SHOTS) await page.screenshot({ path: SHOTS + '/jobs.png', fullPage: true });

  step('the page keeps working across a statelyd restart');
  const long = await ask('submit-chatty 400');
  await page.goto(URL_ + '#/jobs/' + long);
  await page.waitForFunction(() => document.querySelectorAll('#events [data-seq]').length >= 10);
  await ask('restart');
  await page.waitForFunction(() => ['SUCCEEDED', 'FAILED', 'CANCELLED'].some((s) => document.querySelector('#job-state')?.dataset.state === 'JOB_STATE_' + s), null, { timeout: 30000 });
  await page.waitForFunction(() => document.querySelector('#conn').dataset.state === 'connected');
  const after = await seqs(page);
  // The list follows its newest event (scrolled at the next frame, not at each event).
  await page.waitForFunction(() => {
    const e = document.querySelector('#events');
    return e.scrollHeight > e.clientHeight && e.scrollTop + e.clientHeight >= e.scrollHeight - 8;
  }, null, { timeout: 5000 });
  check(contiguous(after), 'across the restart every event once, in order: ' + after.join(','));
  const last = Number(await ask('last-seq ' + long));
  check(after[after.length - 1] === last, `the page has every recorded event (${after.length} of ${last})`);
  await page.goto(URL_ + '#/jobs');
  await page.waitForSelector(`#jobs tr[data-job-id="${long}"]`);

  step('a viewer sees the buttons disabled, and a forged cancel is refused as such');
  const vctx = await browser.newContext();
  const vpage = await vctx.newPage();
  current = vpage;
  await signIn(vpage, VIEWER);
  check((await vpage.textContent('#who')).includes('viewer'), 'the header says viewer');
  const other = await ask('submit-block viewerjob');
  await vpage.goto(URL_ + '#/jobs/' + other);
  await vpage.waitForFunction(() => document.querySelector('#job-state')?.dataset.state === 'JOB_STATE_RUNNING');
  check(await vpage.isDisabled('#cancel'), 'a viewer cannot press cancel');
  const why = await vpage.getAttribute('#cancel', 'title');
  check(why.includes('viewer') && why.includes('operator'), 'the button says why: ' + why);
  // Enable and press in one task: the job page re-renders its buttons as
  // events arrive, so enabling first and clicking later races the render.
  await vpage.evaluate(() => { const b = document.querySelector('#cancel'); b.disabled = false; b.click(); });
  await vpage.waitForFunction(() => document.querySelector('#message').textContent.startsWith('PERMISSION_DENIED'));
  check((await jobState(vpage)) === 'JOB_STATE_RUNNING', 'the job still runs');
  await vpage.goto(URL_ + '#/haproxy');
  await vpage.waitForSelector('tr[data-server="web/s2"]');
  check(await vpage.isDisabled('tr[data-server="web/s2"] button[data-action="drain"]'), 'a viewer cannot drain');
  // Previewing (it runs haproxy -c) and applying edits are an operator's.
  await vpage.click('details.edits summary');
  check(await vpage.isDisabled('button[data-action="preview-edits"]'), 'a viewer cannot preview edits');
  check(await vpage.isDisabled('button[data-action="apply-edits"]'), 'a viewer cannot apply edits');
  check((await vpage.getAttribute('button[data-action="preview-edits"]', 'title')).includes('operator'), 'the preview button says why');
  await ask('cancel ' + other);

  check(!problems.length, 'the page logged no errors: ' + problems.join(' | '));
} catch (e) {
  failed = e;
  if (SHOTS && current) {
    await current.screenshot({ path: SHOTS + '/failure.png', fullPage: true }).catch(() => {});
    process.stdout.write('the page at the failure: ' + SHOTS + '/failure.png (' + current.url() + ')\n');
  }
} finally {
  await browser.close();
}
if (failed) {
  process.stdout.write('FAILED: ' + (failed.stack || failed) + '\n');
  process.exit(1);
}
process.stdout.write('passed\n');
process.exit(0);
