#include "scheduler/block_manager.h"

#include <algorithm>
#include <set>

#include "gtest/gtest.h"

namespace sy::scheduler {
namespace {

TEST(BlockManagerTest, AllocatesCeilOfTokensOverBlockSize) {
  BlockManager bm(10, 4);
  std::vector<int32_t> table;
  EXPECT_EQ(bm.BlocksNeeded(table, 1), 1);
  EXPECT_EQ(bm.BlocksNeeded(table, 4), 1);
  EXPECT_EQ(bm.BlocksNeeded(table, 5), 2);
  ASSERT_TRUE(bm.Allocate(&table, 9));
  EXPECT_EQ(table.size(), 3u);
  EXPECT_EQ(bm.num_free_blocks(), 7);
  // Growing within the last block takes nothing new.
  ASSERT_TRUE(bm.Allocate(&table, 12));
  EXPECT_EQ(table.size(), 3u);
  ASSERT_TRUE(bm.Allocate(&table, 13));
  EXPECT_EQ(table.size(), 4u);
}

TEST(BlockManagerTest, RefusesWithoutChangingTheTableWhenBlocksRunOut) {
  BlockManager bm(3, 2);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(bm.Allocate(&a, 4));
  EXPECT_FALSE(bm.Allocate(&b, 3));
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(bm.num_free_blocks(), 1);
}

TEST(BlockManagerTest, EveryBlockIsOwnedOnceAndFreeingReturnsThemAll) {
  BlockManager bm(16, 4);
  std::vector<std::vector<int32_t>> tables(5);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(bm.Allocate(&tables[i], 3 * i + 1));
  std::set<int32_t> seen;
  size_t total = 0;
  for (const auto& t : tables) {
    total += t.size();
    seen.insert(t.begin(), t.end());
  }
  EXPECT_EQ(seen.size(), total);
  EXPECT_EQ(bm.num_free_blocks() + static_cast<int64_t>(total), 16);
  for (auto& t : tables) bm.Free(&t);
  EXPECT_EQ(bm.num_free_blocks(), 16);
  // A fresh allocation after freeing still hands out distinct, valid ids.
  std::vector<int32_t> all;
  ASSERT_TRUE(bm.Allocate(&all, 64));
  std::sort(all.begin(), all.end());
  for (int i = 0; i < 16; ++i) EXPECT_EQ(all[i], i);
}

}  // namespace
}  // namespace sy::scheduler
