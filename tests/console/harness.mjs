// What the console's browser test (tests/console/console.mjs) and its bench
// (benches/console/bench.mjs) share: Debian's chromium through playwright-core, the question
// and answer protocol with the Rust harness that started statelyd, and signing in.
//
// The harness's part is done by asking for it on stdout as `ask: <what> [arg]`; the harness
// answers on stdin with one line, `ok [value]` or `fail <why>`.
import { createInterface } from 'node:readline';
import { createRequire } from 'node:module';

// playwright-core lives in the node_modules scripts/test.sh makes under target/.
const { chromium } = createRequire(process.env.NODE_MODULES + '/')('playwright-core');

const answers = createInterface({ input: process.stdin });
const pending = [];
answers.on('line', (l) => pending.shift()?.(l));

/** Asks the harness for `what`; resolves with the value of its `ok` line. */
export function ask(what) {
  process.stdout.write('ask: ' + what + '\n');
  return new Promise((resolve, reject) => pending.push((line) => {
    if (line.startsWith('ok')) resolve(line.slice(3));
    else reject(new Error('the harness says: ' + line));
  }));
}

/** Headless chromium with nothing of its own going to the network. */
export function launch(extraArgs = []) {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...extraArgs],
  });
}

/** Opens the console at `url` and signs in with `token`. */
export async function signIn(page, url, token) {
  await page.goto(url);
  await page.waitForSelector('#login:not([hidden])');
  await page.fill('#token', token);
  await page.click('#login button[type=submit]');
  await page.waitForSelector('#nav:not([hidden])');
}
